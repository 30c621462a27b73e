"""Resume, overwrite and extend a run without losing it; publish a model without the publisher's local paths."""

import json
import os
import time

import pytest
import torch
from seiko_child import LoggingOracle, build_trainer, tiny_config

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.feedback.reader import load_feedback
from hf_control_ft.rewards import registry
from hf_control_ft.scripts.arguments import ElegantScriptArguments
from hf_control_ft.serialization.saved import published_base_model
from hf_control_ft.testing import ddim, make_mlp_denoiser
from hf_control_ft.trainers import seiko_state
from hf_control_ft.utils import versioned_dir
from hf_control_ft.utils.versioned_dir import VersionedDirectory

ADAPTER = "pytorch_lora_weights.safetensors"


def _elegant(out, **kw):
    values = dict(num_inference_steps=3, train_steps=2, batch_size=4, learn_initial_noise=False, report_to=None,
                  output_dir=str(out), lora_rank=2, drift_objective="pathwise")
    values.update(kw)
    return ElegantTrainer(ElegantConfig(**values), make_mlp_denoiser(lora=False), ddim(),
                          lambda x: -x.pow(2).sum(1), (2,))


# ----------------------------------------------------------------------------- item 10: ELEGANT
def test_a_finished_model_without_checkpoints_is_never_trained_over_by_a_resume(tmp_path):
    trainer = _elegant(tmp_path)
    trainer.train()
    trainer.save_pretrained(str(tmp_path))
    finished = (tmp_path / ADAPTER).read_bytes()
    # "latest" finds no checkpoint: it would restart from scratch and overwrite the finished adapter
    with pytest.raises(FileExistsError, match=r"finished model \(pytorch_lora_weights.safetensors\) and no "
                                              r"checkpoint.*would train again.*overwrite_output_dir=True"):
        _elegant(tmp_path).train(resume_from_checkpoint="latest")
    with pytest.raises(FileExistsError, match="already holds a finished model"):
        _elegant(tmp_path).train()
    assert (tmp_path / ADAPTER).read_bytes() == finished  # untouched

    # the script's check says the same before any model is loaded, and does not advise "latest"
    args = ElegantScriptArguments(pretrained_model_name_or_path="x", reward="brightness", prompts=["a cat"],
                                  resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest would train it again") as err:
        args.check_output_dir(str(tmp_path), overwrite=False)
    assert "--overwrite_output_dir" in str(err.value)
    args.resume_from_checkpoint = None
    with pytest.raises(ValueError, match="already holds a finished model") as err:
        args.check_output_dir(str(tmp_path), overwrite=False)
    assert "resume_from_checkpoint latest to continue" not in str(err.value)

    # overwrite: the old result is removed when the new run claims the directory (a crash cannot leave it looking
    # like the new run's result)
    fresh = _elegant(tmp_path, overwrite_output_dir=True, train_steps=1)
    fresh.train()
    assert fresh.global_step == 1 and not (tmp_path / ADAPTER).exists()


# ----------------------------------------------------------------------------- item 10: SEIKO
def test_seiko_extends_a_finished_run_asking_only_the_new_rounds(tmp_path):
    out = tmp_path / "run"
    first = build_trainer(out, LoggingOracle(str(tmp_path / "a.jsonl")), num_rounds=2, queries_per_round=[12, 12])
    first.train()
    assert first.completed_rounds == 2 and first.num_queries == 24
    # budgets of rounds already drawn may not change; fewer rounds than were started is refused
    with pytest.raises(ValueError, match=r"first 2 rounds were drawn with queries_per_round \[12, 12\]"):
        build_trainer(out, LoggingOracle(str(tmp_path / "x.jsonl")), num_rounds=3, queries_per_round=[12, 10, 8])
    with pytest.raises(ValueError, match="already started 2 rounds"):
        build_trainer(out, LoggingOracle(str(tmp_path / "x.jsonl")), num_rounds=1, queries_per_round=[12])
    with pytest.raises(ValueError, match=r"different \['learning_rate'\]"):  # a setting that defines the update
        build_trainer(out, LoggingOracle(str(tmp_path / "x.jsonl")), num_rounds=2, queries_per_round=[12, 12],
                      learning_rate=0.5)
    oracle = LoggingOracle(str(tmp_path / "b.jsonl"))
    more = build_trainer(out, oracle, num_rounds=3, queries_per_round=[12, 12, 8])
    assert more.completed_rounds == 2
    more.train()
    assert more.completed_rounds == 3 and more.num_queries == 32
    assert oracle.calls == 2 and len(open(tmp_path / "b.jsonl").readlines()) <= 8  # round 3 only (batches of 5)
    saved = json.load(open(out / "seiko_config.json"))
    assert saved["num_rounds"] == 3 and saved["queries_per_round"] == [12, 12, 8]


def test_seiko_overwrite_output_dir_starts_afresh_and_keeps_the_paid_answers_aside(tmp_path):
    out = tmp_path / "run"
    build_trainer(out, LoggingOracle(str(tmp_path / "a.jsonl")), num_rounds=1, queries_per_round=[12]).train()
    answers = load_feedback(str(out))
    fresh = build_trainer(out, LoggingOracle(str(tmp_path / "b.jsonl")), num_rounds=1, queries_per_round=[12],
                          overwrite_output_dir=True)
    assert fresh.num_queries == 0 and fresh.completed_rounds == 0  # the new run does not read the old one
    (moved,) = os.listdir(out / "replaced")
    kept = load_feedback(str(out / "replaced" / moved))
    assert len(kept) == len(answers) == 12
    assert kept["status"] == answers["status"] and kept["sample"] == answers["sample"]
    fresh.train()
    fresh.train()  # a second train() of the same trainer resumes its own run: nothing is moved again
    assert os.listdir(out / "replaced") == [moved] and fresh.num_queries == 12


def test_seiko_refuses_changed_model_settings_of_the_process(tmp_path):
    config = tiny_config(tmp_path)
    seiko_state.check_resume_config(config, str(tmp_path), 0, {"guidance_scale": 7.5, "prompts_sha256": "a"})
    seiko_state.check_resume_config(config, str(tmp_path), 1, {"guidance_scale": 7.5, "prompts_sha256": "a"})
    with pytest.raises(ValueError, match=r"process.guidance_scale.*7.5.*5.0"):
        seiko_state.check_resume_config(config, str(tmp_path), 1, {"guidance_scale": 5.0, "prompts_sha256": "a"})


# ----------------------------------------------------------------------------- the round-state versions
def test_versions_fsync_before_the_switch_and_nothing_accumulates_over_restarts(tmp_path, monkeypatch):
    root = tmp_path / "state"
    store = VersionedDirectory(str(root), str(root / "current"))
    for name in ("round_0001", "round_0002"):
        tmp = store.begin(name)
        (open(os.path.join(tmp, "state.json"), "w")).write("{}")
        store.commit(name)
    # what killed writers of earlier processes leave: temporaries of a version and of the pointer
    os.makedirs(root / ".tmp-round_0003-999999")
    (root / "current.tmp-999999").write_text("round_0003\n")
    synced = []
    monkeypatch.setattr(versioned_dir, "fsync_tree", lambda path: synced.append(os.path.basename(path)))
    store = VersionedDirectory(str(root), str(root / "current"))  # a restart (holding the run lock)
    assert not (root / ".tmp-round_0003-999999").exists() and not (root / "current.tmp-999999").exists()
    tmp = store.begin("round_0003")
    (open(os.path.join(tmp, "state.json"), "w")).write("{}")
    store.commit("round_0003", keep={"round_0002"})
    assert synced == [f".tmp-round_0003-{os.getpid()}"]  # every file flushed before the rename
    assert store.versions() == ["round_0002", "round_0003"]  # round_0001 of the earlier process is gone


# ----------------------------------------------------------------------------- item 7: what a save publishes
def test_a_save_publishes_no_run_local_setting_and_from_pretrained_adopts_none(tmp_path):
    publisher = tmp_path / "publisher-run"
    trainer = _elegant(publisher, logging_dir=str(publisher / "logs"), report_to="tensorboard",
                       overwrite_output_dir=True, checkpointing_steps=1)
    trainer.train()
    save = tmp_path / "save"
    trainer.save_pretrained(str(save))
    text = (save / "elegant_config.json").read_text()
    for key in ("output_dir", "overwrite_output_dir", "logging_dir", "report_to", "checkpointing_steps"):
        assert f'"{key}"' not in text
    assert str(tmp_path) not in "".join(p.read_text(errors="ignore") for p in save.rglob("*.json"))
    # a save made before the split (it holds the publisher's paths): none of them is adopted
    config = json.loads(text)
    config.update(output_dir=str(publisher), overwrite_output_dir=True, logging_dir=str(publisher / "logs"),
                  report_to="wandb", checkpointing_steps=1)
    (save / "elegant_config.json").write_text(json.dumps(config))
    loaded = ElegantTrainer.from_pretrained(str(save), make_mlp_denoiser(lora=False), ddim(),
                                            lambda x: -x.pow(2).sum(1), report_to=None)
    c = loaded.config
    assert c.output_dir is None and c.overwrite_output_dir is False and c.logging_dir is None
    assert c.report_to is None and c.checkpointing_steps == 0 and c.alpha == trainer.config.alpha


def test_only_hub_ids_are_published_as_base_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-sd").mkdir()
    assert published_base_model("stabilityai/stable-diffusion-3.5-medium") == "stabilityai/stable-diffusion-3.5-medium"
    for local in (str(tmp_path / "local-sd"), "./local-sd", "local-sd", "~/models/sd", "../x/y", "a/b/c", "C:\\sd"):
        assert published_base_model(local) is None
    assert published_base_model("local-sd", given_as_id=True) == "local-sd"  # --base_model_id names an id
    args = ElegantScriptArguments(pretrained_model_name_or_path=str(tmp_path / "local-sd"), reward="brightness",
                                  prompts=["a cat"])
    assert args.base_model() is None
    args.base_model_id = "me/sd15-copy"
    assert args.base_model() == "me/sd15-copy"


# ----------------------------------------------------------------------------- the user's reward file
def test_a_user_reward_file_is_imported_once_per_process(tmp_path):
    path = tmp_path / "my_oracle.py"
    path.write_text("import builtins\nbuiltins.hf_control_ft_imports = getattr(builtins, 'hf_control_ft_imports', 0)"
                    " + 1\ndef oracle(images, prompts):\n    return images.mean((1, 2, 3))\n")
    import builtins

    spec = f"{path}:oracle"
    registry.check_spec(spec, "oracle")
    fn = registry.load_reward(spec)
    registry.load_reward(spec)
    assert builtins.hf_control_ft_imports == 1 and float(fn(torch.ones(1, 3, 2, 2), None)[0]) == 1.0
    time.sleep(0.01)
    path.write_text(path.read_text() + "\n# changed\n")
    registry.load_reward(spec)
    assert builtins.hf_control_ft_imports == 2  # an edited file is imported again
    del builtins.hf_control_ft_imports
