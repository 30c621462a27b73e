"""The reward fine-tuners users pick instead of ELEGANT, as benchmark code (not library features), on the same
LoRA-controlled denoiser and the same stochastic sampler (``ControlledSampler`` on a DDIM or flow-matching schedule):

* **GRPO-style** (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470; DanceGRPO, Xue et al. 2025, arXiv 2505.07818):
  groups of ``group_size`` samples from one shared start ``x_T ~ N(0, I)`` (DanceGRPO's shared initial noise; the
  task is unconditional, so a group is what a prompt's group is there), advantages ``(r - mean_group) / std_batch``
  (Flow-GRPO's ``global_std``) clipped to ``[-5, 5]``, the PPO clipped ratio of the per-step Gaussian transition
  log-likelihood (mean over dimensions, as Flow-GRPO computes it) with clip range ``1e-4``, and the per-step KL
  penalty ``beta ||mu_theta - mu_pre||^2 / (2 sigma_k^2)`` (mean over dimensions) with Flow-GRPO's ``beta = 0.04``.
  Each epoch's samples are split into 2 optimiser steps (Flow-GRPO: ``gradient_accumulation_steps =
  num_batches_per_epoch // 2`` over all timesteps), each accumulating every stochastic step; grad-norm clip 1.
* **DDPO** (Black et al. 2023, arXiv 2305.13301): the same PPO loss with independent starts, advantages
  normalised over the batch (its per-prompt statistics, one prompt here), no KL term.
* **Reward backprop** (AlignProp, Prabhudesai et al. 2023, arXiv 2310.03739; DRaFT-K, Clark et al. 2023, arXiv
  2309.17400): ``x_T ~ N(0, I)``, the chain without gradients except its last ``truncate`` steps, loss ``-mean r``,
  no KL; grad-norm clip 1.

Every network call is counted by :class:`NFECounter` (forward rows, and backward rows for calls whose output
takes part in a backward pass), so methods are compared at equal network evaluations.
"""

from __future__ import annotations

import torch

from hf_control_ft import ControlledSampler
from hf_control_ft.core.control import lora_parameters

ADV_CLIP, CLIP_RANGE, GRPO_BETA = 5.0, 1e-4, 0.04


class NFECounter:
    """Counts the sample-evaluations of a denoiser: ``forward`` rows of every call and ``backward`` rows of every
    call whose output a backward pass reaches (checkpoint recomputations count as forwards: they are work)."""

    def __init__(self, model: torch.nn.Module):
        self.forward = self.backward = 0
        self.paused = False  # evaluations are not training cost
        original = model.forward

        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            if self.paused:
                return out
            y = out if isinstance(out, torch.Tensor) else (out.sample if hasattr(out, "sample") else out[0])
            n = int(y.shape[0])
            self.forward += n
            if y.requires_grad:
                y.register_hook(lambda g: self._backward(n))
            return out

        model.forward = counted

    def pause(self):
        """Context manager: calls inside are not counted."""
        import contextlib

        @contextlib.contextmanager
        def paused():
            self.paused = True
            try:
                yield
            finally:
                self.paused = False

        return paused()

    def _backward(self, n: int):
        self.backward += n

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _gaussian_logp(x_next, mu, std):
    """Per-sample transition log-likelihood, mean over dimensions (Flow-GRPO's form; constants dropped)."""
    return -((x_next - mu) ** 2).reshape(x_next.shape[0], -1).mean(1) / (2 * std**2)


def policy_gradient_epoch(sampler: ControlledSampler, optimizer, reward_fn, shape: tuple, batch_size: int,
                          generator: torch.Generator, method: str, group_size: int = 8,
                          updates_per_epoch: int = 2) -> dict:
    """One epoch of GRPO-style (``method="grpo"``) or DDPO (``"ddpo"``) training (module docstring)."""
    schedule = sampler.schedule
    device = next(sampler.model.parameters()).device  # drawn on the CPU (the generator's), run on the model's
    if method == "grpo":  # groups share their start
        x_T = torch.randn(batch_size // group_size, *shape, generator=generator).repeat_interleave(group_size, 0)
    else:
        x_T = torch.randn(batch_size, *shape, generator=generator)
    x_T = x_T.to(device)
    traj = sampler.rollout(x_T, generator)
    with torch.no_grad():
        r = reward_fn(traj.samples).float()
    if method == "grpo":
        centred = r - r.reshape(-1, group_size).mean(1).repeat_interleave(group_size)
    else:
        centred = r - r.mean()
    adv = (centred / (r.std() + 1e-4)).clamp(-ADV_CLIP, ADV_CLIP)
    steps = [k for k in range(len(schedule)) if schedule.is_stochastic(k)]
    # log-likelihoods under the sampling policy, from the step's own noise (x_{k+1} = mu + sigma * noise): the
    # published trainers record them during sampling, at no extra network call
    old = {k: -(traj.noises[k] ** 2).reshape(batch_size, -1).mean(1) / 2 for k in steps}
    params = lora_parameters(sampler.model)
    beta = GRPO_BETA if method == "grpo" else 0.0
    kl_total = 0.0
    for idx in torch.arange(batch_size).chunk(updates_per_epoch):
        optimizer.zero_grad(set_to_none=True)
        for k in steps:
            std = schedule.std[k].item()
            x_k = traj.states[k][idx]
            mu = sampler.mean(x_k, k, controlled=True)
            ratio = torch.exp(_gaussian_logp(traj.states[k + 1][idx], mu, std) - old[k][idx])
            a = adv[idx]
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE)).mean()
            if beta:
                with torch.no_grad():
                    mu_pre = sampler.mean(x_k, k, controlled=False)
                kl = ((mu - mu_pre) ** 2).reshape(len(idx), -1).mean(1) / (2 * std**2)
                loss = loss + beta * kl.mean()
                kl_total += float(kl.mean().detach())
            (loss / len(steps)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return {"reward": float(r.mean()), "kl_penalty_per_step": kl_total / max(1, len(steps) * updates_per_epoch)}


def reward_backprop_iteration(sampler: ControlledSampler, optimizer, reward_fn, shape: tuple, batch_size: int,
                              generator: torch.Generator, truncate: int) -> dict:
    """One AlignProp / DRaFT-K iteration: gradients through the last ``truncate`` steps only, no KL."""
    schedule = sampler.schedule
    K = len(schedule)
    x = torch.randn(batch_size, *shape, generator=generator).to(next(sampler.model.parameters()).device)
    for k in range(K):
        noise = sampler._noise(x, k, generator)
        if k < K - truncate:
            with torch.no_grad():
                x = schedule.step_from_mean(sampler.mean(x, k), k, noise)
        else:
            x = schedule.step_from_mean(sampler.mean(x, k), k, noise)
    r = reward_fn(x)
    optimizer.zero_grad(set_to_none=True)
    (-r.mean()).backward()
    torch.nn.utils.clip_grad_norm_(lora_parameters(sampler.model), 1.0)
    optimizer.step()
    return {"reward": float(r.mean().detach())}
