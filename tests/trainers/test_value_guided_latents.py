"""``drift_objective="value_guided"`` on a latent text-to-image pipeline: prompt-conditional per-step values,
fitted on a stored subset of each rollout's latents (memory ``value_num_rollouts x m``, not ``x K``)."""

import math

import pytest
import torch

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.core.control import lora_parameters
from hf_control_ft.testing import tiny_sd_pipeline
from hf_control_ft.trainers.objectives import STEP_VALUE_MEMORY_BUDGET, step_value_states_per_rollout

PROMPTS = ["a cat", "a red car"]


def prompt_reward(images, prompts):
    """Bright images for cats, dark ones for cars: the per-step values must depend on the prompt."""
    sign = torch.tensor([1.0 if p == "a cat" else -1.0 for p in prompts], device=images.device)
    return sign * images.mean(dim=(1, 2, 3))


def _trainer(**kw):
    cfg = ElegantConfig(drift_objective="value_guided", num_inference_steps=4, batch_size=2, train_steps=2,
                        value_num_rollouts=8, value_train_steps=5, step_value_train_steps=20, noise_train_steps=2,
                        noise_batch_size=4, aux_hidden=16, report_to=None, seed=0, **kw)
    return ElegantTrainer.from_pipeline(tiny_sd_pipeline(), prompt_reward, cfg, prompts=PROMPTS)


@pytest.mark.parametrize("kept", [1, 4])
def test_value_guided_trains_stable_diffusion_on_prompt_conditional_values_of_a_stored_subset(kept):
    trainer = _trainer(step_value_states_per_rollout=kept)
    assert trainer.config.drift_objective == "value_guided"
    metrics = trainer.fit_step_values()
    numel = math.prod(trainer.sample_shape)
    assert metrics["step_values/states_per_rollout"] == kept
    assert metrics["step_values/stored_mib"] == pytest.approx(8 * kept * numel * 4 / 2**20)  # N x m latents
    values = trainer.step_values
    assert values.net.cond_dim == trainer.process.condition_dim > 0  # V_k(x, c): the pooled text embedding

    seen = []
    gradient = values.gradient

    def recording_gradient(x, k, condition=None):
        seen.append((k, condition))
        return gradient(x, k, condition)

    values.gradient = recording_gradient
    before = [p.detach().clone() for p in lora_parameters(trainer.model)]
    summary = trainer.train()
    after = lora_parameters(trainer.model)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the drift did not move the adapter"
    assert all(torch.isfinite(p).all() for p in after)
    assert math.isfinite(summary["train/kl"]) and summary["train/kl"] > 0
    # every value gradient of the drift is prompt-conditional: the batch's condition features are passed
    schedule = trainer.sampler.schedule  # a target per trained (random) step k: grad V_{k+1}
    assert seen and {k for k, _ in seen} == {k + 1 for k in range(len(schedule) - 1) if schedule.is_stochastic(k)}
    assert all(c is not None and c.shape == (2, trainer.process.condition_dim) for _, c in seen)
    # ... and the fitted values do depend on the prompt
    x = torch.randn(4, *trainer.sample_shape)
    conds = trainer.process.condition_features(["a cat"] * 4), trainer.process.condition_features(["a red car"] * 4)
    with torch.no_grad():
        assert not torch.allclose(values(x, 2, conds[0]), values(x, 2, conds[1]))


def test_stored_states_per_rollout_follow_the_memory_budget():
    cfg = ElegantConfig(num_inference_steps=50, value_num_rollouts=4096, report_to=None)
    assert step_value_states_per_rollout(cfg, 2) == 50  # 2-D samples: every step of every rollout
    latent = 4 * 64 * 64  # SD at 512 px: 64 KiB a latent, 256 MiB a stored step of 4096 rollouts
    assert step_value_states_per_rollout(cfg, latent) == STEP_VALUE_MEMORY_BUDGET // (4096 * latent * 4) == 8
    assert step_value_states_per_rollout(ElegantConfig(step_value_states_per_rollout=3, report_to=None), latent) == 3
    assert step_value_states_per_rollout(ElegantConfig(step_value_states_per_rollout=99, num_inference_steps=10,
                                                       report_to=None), 2) == 10
    with pytest.raises(ValueError, match="step_value_states_per_rollout"):
        ElegantConfig(step_value_states_per_rollout=0)
