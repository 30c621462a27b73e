"""SEIKO on the tiny random Stable Diffusion pipeline: prompts and values in the feedback dataset, both KL terms,
a crash mid-round resumed with the stored prompts, stock ``load_lora_weights`` of the export."""

import json
import math
import os

import pytest
import torch

from hf_control_ft import SeikoConfig, SeikoTrainer
from hf_control_ft.core.control import lora_parameters
from hf_control_ft.feedback.store import FeedbackDataset
from hf_control_ft.testing import tiny_sd_pipeline, tiny_unet_output

PROMPTS = ["a cat", "the dog", "a red car"]


class Crash(BaseException):
    """Not an ``Exception``: the oracle wrapper does not record it as a failed query, it ends the process."""


class PromptOracle:
    """Redness of the image plus a per-prompt offset; logs what it was asked. ``crash_on_call``: raises
    :class:`Crash` on that call (before answering), like a process killed while waiting for the oracle."""

    def __init__(self, crash_on_call=None):
        self.crash_on_call = crash_on_call
        self.calls = 0
        self.images, self.prompts, self.values = [], [], []
        self.__name__ = "prompt_oracle"

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise Crash("killed while waiting for the oracle")
        assert images.ndim == 4 and images.shape[1:] == (3, 16, 16)
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        values = images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))
        values = values + torch.tensor([0.1 * PROMPTS.index(p) for p in prompts])
        self.images.append(images.clone())
        self.prompts.extend(prompts)
        self.values.extend(values.tolist())
        return values


def seiko_sd_config(output_dir, **kw):
    values = dict(num_rounds=2, queries_per_round=[4, 4], oracle_batch_size=3, alpha=0.05, beta=0.05,
                  optimism="ucb", bonus_scale=0.5, ensemble_size=2, reward_hidden=8, reward_depth=1,
                  reward_train_steps=20, eta=1.0, num_inference_steps=3, train_steps=2, batch_size=2,
                  learning_rate=5e-2, lora_rank=2, lora_alpha=6.0, value_num_rollouts=2, value_train_steps=2,
                  noise_train_steps=2, noise_num_steps=2, noise_batch_size=2, aux_hidden=8, log_every=1,
                  report_to=None, output_dir=str(output_dir))
    values.update(kw)
    return SeikoConfig(**values)


def build(output_dir, oracle, **kw):
    torch.manual_seed(0)
    return SeikoTrainer.from_pipeline(tiny_sd_pipeline(), oracle, seiko_sd_config(output_dir, **kw), prompts=PROMPTS,
                                      guidance_scale=2.0, base_model="tiny/sd-random")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Round 1, a crash on round 2's second oracle batch, a restart that finishes round 2, a third start."""
    out = tmp_path_factory.mktemp("seiko_sd") / "run"
    first_oracle = PromptOracle(crash_on_call=4)  # round 1: calls 1-2 (3 + 1); round 2: call 3, crash on 4
    first = build(out, first_oracle)
    init = [p.detach().clone() for p in lora_parameters(first.model)]
    with pytest.raises(Crash):
        first.train()
    after_round_1 = [p.detach().clone() for p in lora_parameters(first.model)]
    crashed = FeedbackDataset(str(out / "feedback"), (4, 8, 8))
    crashed_columns = {k: list(v) for k, v in crashed.columns.items()}

    oracle = PromptOracle()
    trainer = build(out, oracle)
    resumed_at = (trainer.completed_rounds, trainer.global_step)
    loaded = [p.detach().clone() for p in lora_parameters(trainer.model)]
    metrics = trainer.train()

    third_oracle = PromptOracle()
    third = build(out, third_oracle)
    third.train()
    return dict(out=out, first=first, first_oracle=first_oracle, init=init, after_round_1=after_round_1,
                crashed=crashed_columns, trainer=trainer, oracle=oracle, resumed_at=resumed_at, loaded=loaded,
                metrics=metrics, third=third, third_oracle=third_oracle)


def test_crash_and_resume_keep_every_answer_and_reuse_the_stored_prompts(run):
    crashed, oracle = run["crashed"], run["oracle"]
    assert run["first_oracle"].calls == 4 and len(run["first_oracle"].prompts) == 7
    assert crashed["status"] == ["ok"] * 7 + ["pending"] and crashed["round"] == [1] * 4 + [2] * 4
    assert crashed["prompt"][:7] == run["first_oracle"].prompts  # prompts stored with their queries
    assert run["resumed_at"] == (1, 2)
    # the restart asked exactly the one pending query, with its stored prompt and its stored latent
    assert oracle.calls == 1 and oracle.prompts == [crashed["prompt"][7]]
    fb = run["trainer"].feedback
    assert len(fb) == 8 and fb.pending() == [] and [fb.num_submitted(i) for i in (1, 2)] == [4, 4]
    assert fb.columns["prompt"] == crashed["prompt"] and set(fb.columns["prompt"]) <= set(PROMPTS)
    assert fb.columns["value"][:7] == crashed["value"][:7]  # nothing answered before the crash was touched
    assert fb.columns["value"] == run["first_oracle"].values + oracle.values
    assert all(math.isfinite(v) for v in fb.columns["value"]) and fb.columns["status"] == ["ok"] * 8
    # the oracle saw the decoded stored latents
    asked = torch.cat(run["first_oracle"].images + oracle.images)
    torch.testing.assert_close(asked, run["trainer"].decode(fb.samples(list(range(8)))), rtol=0, atol=1e-6)
    # a finished run started again asks nothing
    assert run["third_oracle"].calls == 0 and len(run["third"].feedback) == 8 and run["third"].completed_rounds == 2


def test_rounds_report_both_kl_terms_and_change_the_lora(run):
    trainer, metrics = run["trainer"], run["metrics"]
    assert type(trainer) is SeikoTrainer and type(trainer.process).__name__ == "StableDiffusionProcess"
    assert trainer.sample_shape == (4, 8, 8)
    assert metrics["round"] == 2 and trainer.global_step == 4
    assert metrics["train/kl_pretrained"] > 0 and metrics["train/kl_previous"] > 0
    assert math.isfinite(metrics["train/objective"]) and metrics["reward_model/num_train"] == 8
    assert metrics["reward_model/bonus_on_data"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(run["init"], run["after_round_1"]))
    assert all(torch.equal(a, b) for a, b in zip(run["after_round_1"], run["loaded"]))  # resumed state
    assert any(not torch.equal(a, b) for a, b in zip(run["loaded"], lora_parameters(trainer.model)))
    latents = trainer.sample(prompts=PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    images = trainer.decode(latents)
    assert latents.shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16)
    assert trainer.process.current_conditions == PROMPTS[:2]


def test_export_loads_with_stock_load_lora_weights(run, tmp_path):
    trainer = run["trainer"]
    trainer.save_pretrained(str(tmp_path / "export"))
    files = set(os.listdir(tmp_path / "export"))
    assert {"pytorch_lora_weights.safetensors", "seiko_config.json", "stable_diffusion.json", "README.md"} <= files
    assert json.load(open(tmp_path / "export" / "stable_diffusion.json"))["guidance_scale"] == 2.0
    pipe = tiny_sd_pipeline()
    base = tiny_unet_output(pipe.unet)
    pipe.load_lora_weights(str(tmp_path / "export"))
    trained = tiny_unet_output(trainer.model.unet)
    assert torch.equal(tiny_unet_output(pipe.unet), trained)
    assert not torch.allclose(base, trained, atol=1e-4)


def test_adapter_aware_checkpointing_recomputes_the_previous_adapter_branch(tmp_path):
    """The KL to the previous round's adapter backpropagates through UNet calls made with that adapter active;
    block checkpointing must recompute them with it (not with the trainable adapter)."""

    def grads(checkpointing):
        trainer = build(tmp_path / f"ckpt_{checkpointing}", PromptOracle(), gradient_checkpointing=checkpointing)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name in ("control", "previous"):
                for p in lora_parameters(trainer.model, name):
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        trainer.process.set_conditions(PROMPTS[:2])
        x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        traj = trainer.sampler.rollout(x_T, torch.Generator().manual_seed(6))
        trainer.sampler.backpropagate(traj, torch.ones_like(traj.samples) / 2, 0.5, reference_kl_weight=0.5)
        assert all(p.grad is None for p in lora_parameters(trainer.model, "previous"))
        assert float(traj.ref_kl.min()) > 0
        return torch.cat([p.grad.flatten() for p in lora_parameters(trainer.model)])

    plain = grads(False)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(grads(True), plain, rtol=1e-4, atol=1e-6)


def test_push_to_hub_uploads_the_model_and_the_feedback_dataset(run, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from datasets import Dataset
    from hub_server import HubServer
    from huggingface_hub import hf_hub_download

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    trainer = run["trainer"]
    with HubServer() as hub:
        commit = trainer.push_to_hub("me/seiko-sd", token="hf_test_token_sd", endpoint=hub.url,
                                     feedback_repo_id="me/seiko-sd-feedback")
        model = hub.repos["me/seiko-sd"]
        assert commit.oid == model.sha
        assert {"pytorch_lora_weights.safetensors", "seiko_config.json", "stable_diffusion.json"} <= set(model.files)
        assert "me/seiko-sd-feedback" in hub.dataset_repos and "me/seiko-sd-feedback" not in hub.repos
        path = hf_hub_download("me/seiko-sd-feedback", "data/train-00000-of-00001.parquet", repo_type="dataset",
                               endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
    pulled = Dataset.from_parquet(path, cache_dir=str(tmp_path / "pq"))
    fb = trainer.feedback
    assert pulled["prompt"] == fb.columns["prompt"] and pulled["value"] == fb.columns["value"]
    torch.testing.assert_close(torch.tensor(pulled["sample"]).reshape(8, 4, 8, 8), fb.samples(list(range(8))))


def test_bf16_mixed_precision_keeps_both_adapters_in_fp32(tmp_path):
    torch.manual_seed(0)
    pipe = tiny_sd_pipeline()
    trainer = SeikoTrainer.from_pipeline(pipe, PromptOracle(), seiko_sd_config(tmp_path / "run", num_rounds=1,
                                                                               queries_per_round=[3]),
                                         prompts=PROMPTS, guidance_scale=2.0, mixed_precision="bf16")
    # kl_precision="fp32" (default): fp32 UNet weights for the KL passes, bf16 VAE
    assert pipe.unet.conv_in.weight.dtype == torch.float32 and pipe.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    for name in ("control", "previous"):
        assert all(p.dtype == torch.float32 for p in lora_parameters(trainer.model, name))
    metrics = trainer.train()
    assert metrics["train/kl_pretrained"] > 0 and metrics["train/kl_previous"] > 0
    assert math.isfinite(metrics["train/objective"]) and len(trainer.feedback) == 3
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_parameters(trainer.model))


def test_ucb_bonus_is_computed_on_clip_image_embeddings(tmp_path):
    """The documented text-to-image default: reward heads and the UCB bonus on a frozen CLIP image tower's
    normalised embeddings (a tiny random CLIP here), not on latents or pixels."""
    from hf_control_ft.rewards import CLIPImageFeatures
    from hf_control_ft.testing import tiny_clip_model

    model, _ = tiny_clip_model()
    clip = CLIPImageFeatures(model)
    torch.manual_seed(0)
    trainer = SeikoTrainer.from_pipeline(tiny_sd_pipeline(), PromptOracle(), seiko_sd_config(tmp_path / "clip",
                                         num_rounds=1, queries_per_round=[6]), prompts=PROMPTS,
                                         guidance_scale=2.0, feature_extractor=clip)
    trainer.collect_feedback(1)
    trainer.fit_reward(1)
    ensemble = trainer.reward.ensemble
    latents = trainer.feedback.samples(list(range(6)))
    embeddings = clip(trainer.process.decode(latents))
    assert ensemble.f_mean.shape == (embeddings.shape[1],) and embeddings.shape[1] == clip.dim
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(6), atol=1e-5)
    # the ensemble's standardised features are exactly the CLIP embeddings of the decoded queries
    torch.testing.assert_close(ensemble.features(latents), (embeddings - ensemble.f_mean) / ensemble.f_std)
    r_hat, bonus = trainer.reward.parts(latents)
    phis = ensemble.head_outputs(latents)[1]
    width = torch.einsum("hbi,hij,hbj->hb", phis, ensemble.gram_inv, phis).sqrt().mean(0)
    assert (bonus > 0).all()
    torch.testing.assert_close(bonus, trainer.reward.saturate(
        trainer.config.bonus_scale * (trainer.config.alpha + trainer.config.beta) * width))


class ModelOracle(torch.nn.Module):
    """An oracle that is a model (a VLM judge, a preference model): records where it is when asked and where it
    is sent."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.moves, self.devices_when_asked = [], []
        self.__name__ = "model_oracle"

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]))
        return super().to(*args, **kwargs)

    def forward(self, images, prompts):
        self.devices_when_asked.append(self.moves[-1] if self.moves else None)
        return self.weight.detach() * images[:, 0].mean((1, 2))


@pytest.mark.parametrize("offload", [False, True])
def test_offload_keeps_a_model_oracle_off_the_accelerator_between_rounds(tmp_path, offload):
    oracle = ModelOracle()
    trainer = SeikoTrainer.from_pipeline(tiny_sd_pipeline(), oracle,
                                         seiko_sd_config(tmp_path / "run", num_rounds=1, queries_per_round=4,
                                                         train_steps=1),
                                         prompts=PROMPTS, guidance_scale=2.0, offload=offload)
    trainer.train()
    device = str(trainer.device)
    if offload:  # brought to the accelerator for the round's oracle phase only, then back to the CPU
        assert oracle.moves == [device, "cpu"] and set(oracle.devices_when_asked) == {device}
    else:
        assert oracle.moves == [] and len(oracle.devices_when_asked) == 2
