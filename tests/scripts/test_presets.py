"""Family presets: the scripts read the base model's family from ``model_index.json`` and take its settings for
every field no flag and no ``--config`` sets; the example YAMLs hold the same values."""

import os

import pytest
import yaml

from hf_control_ft import ElegantConfig, SeikoConfig
from hf_control_ft.scripts import ElegantScriptArguments, SeikoScriptArguments
from hf_control_ft.scripts.arguments import parse_script_args
from hf_control_ft.scripts.presets import PRESETS, detect_family
from hf_control_ft.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples", "text_to_image")
MAKERS = {"sd15": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for family, make in MAKERS.items():
        make().save_pretrained(root / family)
    return root


@pytest.mark.parametrize("family", list(MAKERS))
def test_each_family_gets_its_preset_where_the_user_set_nothing(saved, family, tmp_path):
    assert detect_family(str(saved / family)) == family
    base = ["--pretrained_model_name_or_path", str(saved / family), "--prompts", "a cat", "--reward", "brightness",
            "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    args, config = parse_script_args(ElegantScriptArguments, ElegantConfig, [*base, "--batch_size", "3"])
    preset = PRESETS[family]
    assert (args.resolution, args.guidance_scale, config.num_inference_steps) == (
        preset["resolution"], preset["guidance_scale"], preset["num_inference_steps"])
    assert config.batch_size == 3 and config.value_num_rollouts == preset["value_num_rollouts"]  # the flag wins
    assert args.kl_precision == preset.get("kl_precision", "fp32")
    assert args.preset_note.startswith(f"{family} preset") and "--batch_size" not in args.preset_note
    # a --config value wins over the preset too; SEIKO takes the fields it has
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("num_inference_steps: 7\nresolution: 64\n")
    args, config = parse_script_args(SeikoScriptArguments, SeikoConfig,
                                     ["--pretrained_model_name_or_path", str(saved / family), "--prompts", "a cat",
                                      "--oracle", "brightness", "--output_dir", str(tmp_path / "seiko"),
                                      "--report_to", "none", "--config", str(cfg)])
    assert (config.num_inference_steps, args.resolution, config.batch_size) == (7, 64, preset["batch_size"])


def test_an_unknown_model_gets_no_preset(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "SomeOtherPipeline"}')
    assert detect_family(str(tmp_path / "other")) is None
    assert detect_family(str(tmp_path / "missing")) is None  # neither a directory nor a reachable Hub repo
    args, config = parse_script_args(ElegantScriptArguments, ElegantConfig,
                                     ["--pretrained_model_name_or_path", str(tmp_path / "other"), "--prompts", "a",
                                      "--reward", "brightness", "--output_dir", str(tmp_path / "o"),
                                      "--report_to", "none"])
    assert config.batch_size == ElegantConfig().batch_size and args.preset_note is None


@pytest.mark.parametrize("family, name", [("sd15", "sd15_aesthetic"), ("sdxl", "sdxl"), ("sd3", "sd3"),
                                          ("flux", "flux"), ("qwen-image", "qwen_image"),
                                          ("flux2-klein", "flux2_klein"), ("z-image", "z_image"), ("wan", "wan")])
def test_the_example_yaml_of_each_family_holds_its_preset(family, name):
    values = yaml.safe_load(open(os.path.join(EXAMPLES, f"{name}.yaml")))
    assert {k: values[k] for k in PRESETS[family]} == PRESETS[family]
    assert values["reward"] and values["alpha"] > 0 and values["pretrained_model_name_or_path"]


def test_the_family_of_a_hub_model_is_read_from_its_model_index_alone(tmp_path, monkeypatch):
    """One small request for ``model_index.json`` (an in-process Hub here), no retries: an unreachable Hub costs
    no time before the pipeline's own download reports it."""
    import time

    import huggingface_hub.constants as hub_constants
    from hub_server import HubServer
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token="hf_x")
        api.create_repo("bfl/flux-like")
        api.upload_file(path_or_fileobj=b'{"_class_name": "FluxPipeline"}', path_in_repo="model_index.json",
                        repo_id="bfl/flux-like")
        assert detect_family("bfl/flux-like", endpoint=hub.url) == "flux"
    start = time.monotonic()
    assert detect_family("bfl/other-model", endpoint="http://127.0.0.1:9") is None  # nothing listens there
    assert time.monotonic() - start < 5
