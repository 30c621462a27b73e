import json
import os

import pytest
import torch

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.core.control import lora_parameters
from hf_control_ft.serialization import checkpoints as checkpointing
from hf_control_ft.testing import ddim, make_mlp_denoiser


def quadratic_reward(x):
    return -(x - 1.0).pow(2).sum(1)


def config(out, **kw):
    base = dict(alpha=1.0, num_inference_steps=4, train_steps=6, batch_size=8, value_num_rollouts=16,
                value_train_steps=2, noise_train_steps=2, noise_num_steps=3, aux_hidden=16, report_to=None,
                learning_rate=1e-2, log_every=2, output_dir=str(out), checkpointing_steps=2, checkpoints_total_limit=2,
                        step_value_train_steps=50)  # drift_objective "auto" -> "value_guided" on this process
    base.update(kw)
    return ElegantConfig(**base)


def make_trainer(out, **kw):
    return ElegantTrainer(config(out, **kw), make_mlp_denoiser(lora=False, seed=3), ddim(), quadratic_reward, (2,))


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.train()
    steps = [s for s, _ in checkpointing.list_checkpoints(str(tmp_path / "full"))]
    assert steps == [4, 6]  # rotation kept the newest two (checkpoint-0, -2 removed)
    assert not any(".tmp" in name for name in os.listdir(tmp_path / "full"))

    # a run that "crashed" after step 4: restart from that checkpoint with a fresh model
    resumed = make_trainer(tmp_path / "full")
    summary = resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert resumed.config.drift_objective == "value_guided"  # its step values are refitted identically on resume
    assert resumed.global_step == 6
    assert "value/loss" not in summary  # stages 1-2 were not repeated
    for a, b in zip(lora_parameters(full.model), lora_parameters(resumed.model)):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(full.sample(16, generator=g), resumed.sample(16, generator=torch.Generator().manual_seed(0)))
    off = resumed.drift_log_offset  # tracker steps: stage 1 at 0, stage 2 at 1..N, drift step n at N + 1 + n
    assert off == resumed.config.noise_train_steps + 1
    assert [h["step"] - off for h in resumed.history if "train/reward" in h] == [2, 4, 6]
    steps = [h["step"] for h in full.history]
    assert steps == sorted(steps) and steps[0] == 0  # never back, across the stages


def test_latest_with_no_checkpoint_starts_fresh_and_bad_path_errors(tmp_path):
    trainer = make_trainer(tmp_path / "run", train_steps=2, learn_initial_noise=False)
    summary = trainer.train(resume_from_checkpoint="latest")
    assert summary["resumed_from"] is None and trainer.global_step == 2
    state = json.load(open(tmp_path / "run" / "checkpoint-2" / "trainer_state.json"))
    assert state["global_step"] == 2 and state["optimizer"]["param_groups"][0]["lr"] == 1e-2
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        make_trainer(tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "nope"))


def test_optimizer_state_round_trips_through_safetensors_layout():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    tensors, meta = checkpointing.optimizer_state_tensors(opt)
    assert set(tensors) == {"0.step", "0.exp_avg", "0.exp_avg_sq"}
    json.dumps(meta)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    checkpointing.load_optimizer_state(opt2, tensors, meta)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_checkpointing_requires_output_dir():
    with pytest.raises(ValueError, match="ElegantConfig.output_dir"):
        ElegantConfig(checkpointing_steps=5)


def test_a_text_to_image_resume_refuses_another_model_reward_prompt_guidance_or_size(tmp_path):
    """An ELEGANT checkpoint records what it was trained on: resuming it with another base model, reward, prompts,
    guidance, size or precision would train one adapter on two objectives; refused, naming the flag."""
    from family_checks import redness, tiny_config

    from hf_control_ft import ElegantTrainer
    from hf_control_ft.testing import tiny_sd_pipeline

    def trainer(reward=redness, prompts=("a cat", "the dog"), **options):
        config = tiny_config(train_steps=2, checkpointing_steps=1, output_dir=str(tmp_path / "run"))
        opts = {"guidance_scale": 3.0, "base_model": "tiny/sd", **options}
        return ElegantTrainer.from_pipeline(tiny_sd_pipeline(), reward, config, list(prompts), **opts)

    trainer().train()

    def bluish(images, prompts):
        return images[:, 2].mean(dim=(1, 2))

    for changed, flag in ((dict(guidance_scale=5.0), "--guidance_scale: 3.0, now 5.0"),
                          (dict(base_model="tiny/other"), "--pretrained_model_name_or_path: 'tiny/sd', now 'tiny/other'"),
                          (dict(prompts=("a bird",)), "--prompts / --prompts_file / --dataset_name: (changed)"),
                          (dict(reward=bluish), "--reward: 'redness', now 'bluish'"),
                          (dict(height=32, width=32), "--height / --resolution: None, now 32")):
        with pytest.raises(ValueError, match="trained on another setting") as err:
            trainer(**changed).train(resume_from_checkpoint="latest")
        assert flag in str(err.value), str(err.value)
    assert trainer().train(resume_from_checkpoint="latest")["resumed_from"].endswith("checkpoint-2")
