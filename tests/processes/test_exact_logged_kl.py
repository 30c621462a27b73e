"""Half-precision KL passes train; the logged KL is exact (issue: ELEGANT at the field's speed, item 3).

With ``kl_precision="autocast"`` (bf16 passes, as GRPO-style trainers run) the KL the trainer logs at its logging
steps is recomputed on the last micro-batch's own transitions in fp32 arithmetic over the same stored weights. The
reference is ``kl_precision="upcast"`` on the same pipeline (tested against fp32 weights in ``test_upcast.py``)."""

import math

import pytest
import torch

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.testing import scale_lora, tiny_sd_pipeline, tiny_sd3_pipeline

def _brightness(images):
    return images.float().mean(dim=(1, 2, 3))


FAMILIES = {"sd": (tiny_sd_pipeline, 0.05, 7.5), "sd3": (tiny_sd3_pipeline, 0.5, 5.0)}


def _trainer(family, kl_precision, **overrides):
    build, scale, guidance = FAMILIES[family]
    torch.manual_seed(0)
    cfg = ElegantConfig(**{**dict(alpha=1.0, eta=1.0, num_inference_steps=10, learn_initial_noise=False,
                                  batch_size=2, report_to=None, lora_rank=4, drift_objective="pathwise",
                                  log_every=1, learning_rate=1e-4), **overrides})
    trainer = ElegantTrainer.from_pipeline(build(), _brightness, cfg, prompts=["a cat", "a red car"], guidance_scale=guidance,
                                           mixed_precision="bf16", kl_precision=kl_precision)
    scale_lora(trainer.model, scale)
    return trainer


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_exact_kl_of_half_precision_transitions_is_the_upcast_modes(family):
    half, exact = _trainer(family, "autocast"), _trainer(family, "upcast")
    assert exact.process.exact_kl_context() is None  # its KL passes are exact already
    gen = torch.Generator().manual_seed(0)
    half.process.prepare_batch(2, gen)
    x_T = torch.randn((2, *half.sample_shape), generator=gen)
    traj = half.sampler.rollout(x_T, gen, measure_kl=True)  # bf16 passes: the training precision's KL
    exact.process.prepare_batch(2, torch.Generator().manual_seed(0))
    reference = exact.sampler.trajectory_kl(traj)  # the same transitions, upcast (exact) passes
    recomputed = half.sampler.trajectory_kl(traj, half.process.exact_kl_context())
    assert float(reference.mean()) >= 0.1
    torch.testing.assert_close(recomputed, reference, rtol=1e-3, atol=1e-4)
    assert float((traj.kl - reference).abs().max()) > 100 * float((recomputed - reference).abs().max())


def test_training_with_half_precision_passes_logs_the_exact_kl_with_its_error():
    trainer = _trainer("sd", "autocast", train_steps=2)
    summary = trainer.train()
    rows = [h for h in trainer.history if "train/kl" in h]
    assert len(rows) == 2
    for row in rows:
        assert row["train/kl"] >= 0.1 and math.isfinite(row["train/kl_se"]) and row["train/kl_se"] > 0
        assert "train/kl_in_training_precision" in row
        assert row["train/kl"] != row["train/kl_in_training_precision"]
        assert row["train/objective"] == pytest.approx(row["train/reward"] - row["train/kl_total"], rel=1e-6)
    assert summary["train/kl_total"] == pytest.approx(rows[-1]["train/kl_total"])
    exact = _trainer("sd", "upcast", train_steps=1)
    exact.train()
    assert "train/kl_in_training_precision" not in exact.history[-1]  # exact passes: nothing re-evaluated


def test_seiko_with_half_precision_passes_logs_both_kls_exactly(tmp_path):
    from hf_control_ft import SeikoConfig, SeikoTrainer

    def oracle(images, prompts):
        return images[:, 0].float().mean((1, 2))

    config = SeikoConfig(num_rounds=1, queries_per_round=4, oracle_batch_size=4, alpha=0.05, beta=0.05,
                         ensemble_size=2, reward_hidden=8, reward_depth=1, reward_train_steps=5, eta=1.0,
                         num_inference_steps=4, train_steps=2, batch_size=2, lora_rank=2, value_num_rollouts=2,
                         value_train_steps=2, noise_train_steps=2, noise_num_steps=2, noise_batch_size=2, aux_hidden=8,
                         log_every=1, report_to=None, output_dir=str(tmp_path / "run"))
    trainer = SeikoTrainer.from_pipeline(tiny_sd_pipeline(), oracle, config, prompts=["a cat", "a dog"],
                                         mixed_precision="bf16", kl_precision="autocast")
    trainer.train()
    rows = [h for h in trainer.history if "train/kl_previous" in h]
    assert len(rows) == 2
    for row in rows:  # the exact values are logged, the training passes' beside them
        assert "train/kl_pretrained_in_training_precision" in row and "train/kl_previous_in_training_precision" in row
        assert math.isfinite(row["train/kl_pretrained"]) and row["train/kl_pretrained"] >= 0
