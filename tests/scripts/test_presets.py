"""Family presets: the scripts read the base model's family from ``model_index.json`` and take its settings for
every field no flag and no ``--config`` sets; the example YAMLs hold the same values."""

import os

import pytest
import yaml

from hf_control_ft import ElegantConfig, SeikoConfig
from hf_control_ft.scripts import ElegantScriptArguments, SeikoScriptArguments
from hf_control_ft.scripts.arguments import parse_script_args
from hf_control_ft.scripts.presets import PRESETS, FamilyLookupError, detect_family
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
    with pytest.raises(FamilyLookupError, match="model_index.json"):  # nothing listens there
        detect_family("bfl/other-model", endpoint="http://127.0.0.1:9")
    assert time.monotonic() - start < 5


def _base(model, tmp_path, *extra):
    return ["--pretrained_model_name_or_path", model, "--prompts", "a cat", "--reward", "brightness",
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", *extra]


def test_a_preset_that_cannot_be_read_is_never_silently_dropped(tmp_path, capsys, monkeypatch):
    """model_index.json unreadable (offline, gated FLUX.1-dev, a slow link): the run stops before anything loads and
    names --model_family, instead of training a 12B model with batch 64 and 4096 value rollouts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FamilyLookupError):
        detect_family(str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as stop:
        parse_script_args(ElegantScriptArguments, ElegantConfig, _base("black-forest-labs/FLUX.1-dev", tmp_path))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--model_family" in err and "flux" in err and "model_index.json" in err
    args, config = parse_script_args(ElegantScriptArguments, ElegantConfig,
                                     _base("black-forest-labs/FLUX.1-dev", tmp_path, "--model_family", "flux"))
    assert config.batch_size == PRESETS["flux"]["batch_size"] and args.kl_precision == "delta"
    args, config = parse_script_args(ElegantScriptArguments, ElegantConfig,
                                     _base("black-forest-labs/FLUX.1-dev", tmp_path, "--model_family", "none"))
    assert config.batch_size == ElegantConfig().batch_size and args.preset_note is None
    with pytest.raises(SystemExit):
        parse_script_args(ElegantScriptArguments, ElegantConfig, _base("x/y", tmp_path, "--model_family", "sd4"))
    assert "--model_family: must be one of" in capsys.readouterr().err


def test_a_family_that_does_not_match_the_loaded_pipeline_is_refused(saved, tmp_path, capsys):
    from hf_control_ft.scripts import run_elegant

    with pytest.raises(SystemExit) as stop:
        run_elegant(_base(str(saved / "sd15"), tmp_path, "--model_family", "sdxl", "--train_steps", "1"))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "StableDiffusionPipeline" in err and "--model_family sd15" in err


def test_run_time_errors_speak_flags():
    from hf_control_ft.scripts.arguments import as_flag, flag_names
    from hf_control_ft.trainers.seiko_config import SeikoConfig

    fields = flag_names(SeikoScriptArguments, SeikoConfig)
    assert as_flag("use another output_dir (or overwrite_output_dir=True)", fields) == \
        "use another output_dir (or --overwrite_output_dir)"
    assert as_flag("num_rounds=2 would stop it midway: give num_rounds >= 4", fields) == \
        "--num_rounds 2 would stop it midway: give --num_rounds 4 or more"
    assert as_flag("(min_answer_fraction=0.5); all oracle_max_attempts=3 sends", fields) == \
        "(--min_answer_fraction 0.5); all --oracle_max_attempts 3 sends"
    assert as_flag("ElegantConfig.drift_objective: the flux process", fields) == "--drift_objective: the flux process"
    assert as_flag("x=1 and learn_initial_noise=False", fields) == "x=1 and --no_learn_initial_noise"


def test_pipelines_load_in_the_runs_dtypes_with_the_same_weights(saved):
    """--mixed_precision bf16: every component loads in bf16 (the denoiser in fp32 under --kl_precision fp32), with
    the very weights a fp32 load cast down gives: nothing is materialised in fp32 only to be cast."""
    import torch

    from hf_control_ft.processes.loading import load_base_pipeline
    from hf_control_ft.processes.options import load_dtype

    path = str(saved / "sd3")
    exact = load_base_pipeline(path, torch_dtype=load_dtype("fp32", "bf16"))
    upcast = load_base_pipeline(path, torch_dtype=load_dtype("upcast", "bf16"))
    fp32 = load_base_pipeline(path)
    assert exact.transformer.dtype == torch.float32 and exact.vae.dtype == torch.bfloat16
    assert upcast.transformer.dtype == torch.bfloat16 and upcast.text_encoder.dtype == torch.bfloat16
    for ours, ref in zip(upcast.transformer.state_dict().values(), fp32.transformer.state_dict().values()):
        assert torch.equal(ours, ref.to(torch.bfloat16))
    assert load_dtype("fp32", "no") is None


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_the_start_up_cost_estimate_uses_the_flops_the_cost_model_counts(family):
    """``TFLOP_PER_EVALUATION`` is ``benchmarks/cost_model.py``'s count at the preset's size (meta device)."""
    import sys

    from hf_control_ft.scripts.presets import TFLOP_PER_EVALUATION

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import cost_model
    finally:
        sys.path.pop(0)
    assert cost_model.evaluation_tflop(family) == pytest.approx(TFLOP_PER_EVALUATION[family], rel=0.005)
    if family == "sd15":  # the fp32 rate the estimate assumes is the one the GPU measurement implies
        from hf_control_ft.trainers.costs import BF16_TFLOPS, FP32_TFLOPS

        assert cost_model.calibrated_fp32_tflops(BF16_TFLOPS) == pytest.approx(FP32_TFLOPS, abs=0.05)


def test_the_script_logs_the_modelled_gpu_hours_of_the_run():
    from hf_control_ft import ElegantTrainer
    from hf_control_ft.scripts.text_to_image import model_estimate

    fields = {k: v for k, v in PRESETS["sd15"].items() if k in {"num_inference_steps", "batch_size", "train_steps",
                                                                  "gradient_accumulation_steps", "value_num_rollouts"}}
    config = ElegantConfig(report_to=None, drift_objective="pathwise", **fields)
    trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), None, config, ["a cat"], height=512, width=512)
    line = model_estimate(trainer, "sd15", num_processes=1)
    assert "about 55." in line and "GPU-hours" in line and "248x plain sampling" in line  # the README's SD 1.5 row
    half = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), None, config, ["a cat"], height=256, width=256,
                                        kl_precision="autocast", mixed_precision="bf16")
    assert "7x plain sampling" in model_estimate(half, "sd15", num_processes=2)  # bf16 KL passes
