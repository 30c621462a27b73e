"""One stage-3 iteration of the drift, shared by ELEGANT and SEIKO (``docs/algorithms.md`` §7).

:class:`DriftIterations` is a mixin of :class:`~hf_control_ft.trainers.base.BaseTrainer`: rollouts of the controlled
chain, the backward sweep of the configured drift objective (pathwise, adjoint matching, value-guided, with an
optional KL to a frozen reference adapter), gradient accumulation over micro-batches, the finite-gradient guard and
the optimiser step; where the process's KL passes are half precision, the exact KL of the last micro-batch at
logging steps.
"""

from __future__ import annotations

import functools
import math

import torch

from ..core.adjoint_matching import adjoint_matching_backward


class DriftIterations:
    """Stage-3 iterations (mixin: needs the trainer's ``config``, ``process``, ``sampler``, ``generator``,
    ``device``, ``ema`` and its reward / initial-noise / gradient helpers)."""

    def reward_backprop_step(self, optimizer) -> None:
        """The no-KL baseline iteration (AlignProp / DRaFT): ``x_T ~ N(0, I)``, reward backpropagation through
        the same sampler and backward sweep, no KL terms, no initial-noise model. The step-cost benchmarks
        time it as the reference cost of an ELEGANT iteration."""
        B = self.config.batch_size
        self.process.prepare_batch(B, self.generator)
        x_T = torch.randn((B, *self.sample_shape), generator=self.generator).to(self.device)
        traj = self.sampler.rollout(x_T, self.generator)
        _, grad_x0 = self.reward_and_gradient(traj.samples)
        optimizer.zero_grad(set_to_none=True)
        self.sampler.backpropagate(traj, -grad_x0 / B, None)
        optimizer.step()

    def drift_iteration(self, optimizer, params, generator: torch.Generator | None = None,
                        reference_kl_weight: float | None = None, value_gradient=None) -> dict:
        """One drift step on ``mean(-r + alpha (KL + KL_init) [+ beta KLref])``; returns raw quantities.

        The objective is ``config.drift_objective`` (``docs/algorithms.md`` §7): the exact pathwise gradient,
        or the adjoint-matching / value-guided regression (``value_gradient``: ``(x, k) -> grad V_k``). With
        ``reference_kl_weight`` (SEIKO's ``beta``) the KL to the sampler's reference adapter is added
        (pathwise only). With ``gradient_accumulation_steps = G`` the step averages the gradients of ``G``
        micro-batches of ``batch_size`` before the optimiser step. Returns ``{"reward", "kl", "kl_init",
        "ref_kl", "grad_norm", "regression_loss"}`` as ``(B * G,)`` tensors / floats, and ``"kl_exact"``: where the
        process's KL passes are half precision and ``self._exact_kl_due`` is set (a logging step), the exact path
        KL ``(B,)`` of the last micro-batch (its samples are the last ``B`` of the others), else ``None`` (and
        ``"ref_kl_exact"``, its KL to the reference chain, with ``reference_kl_weight``).
        """
        cfg = self.config
        B, G = cfg.batch_size, cfg.gradient_accumulation_steps
        gen = generator if generator is not None else self.generator
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for _ in range(G):  # G micro-batches of B: the gradient of the mean over B * G samples, memory of B
            parts.append(self._accumulate_gradient(B * G, gen, reference_kl_weight, value_gradient))
        out = {k: torch.cat([p[k] for p in parts]) for k in ("reward", "kl", "kl_init", "ref_kl")
               if parts[0][k] is not None}
        losses = [p["regression_loss"] for p in parts if p["regression_loss"] is not None]
        regression_loss = sum(losses) / len(losses) if losses else None
        r = out["reward"]
        context = self.process.exact_kl_context()
        if context is not None and getattr(self, "_exact_kl_due", False):
            # half-precision KL passes: the logged KL is recomputed exactly on the last micro-batch's own
            # transitions, before the step changes the control that drew them
            exact = self.sampler.trajectory_kl(parts[-1]["trajectory"], context,
                                               reference=reference_kl_weight is not None)  # SEIKO: both KLs
            out["kl_exact"], out["ref_kl_exact"] = exact if reference_kl_weight is not None else (exact, None)
        self._sync_grads(params)
        skipped = not self._gradients_finite(params, r)
        grad_norm = math.nan if skipped else self._clip(params)
        if skipped:
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
            if self.ema is not None:
                self.ema.update()
        return {"reward": r, "kl": out["kl"], "kl_init": out["kl_init"], "ref_kl": out.get("ref_kl"),
                "kl_exact": out.get("kl_exact"), "ref_kl_exact": out.get("ref_kl_exact"), "grad_norm": grad_norm,
                "regression_loss": regression_loss, "skipped": skipped}

    def _accumulate_gradient(self, total: int, gen, reference_kl_weight, value_gradient) -> dict:
        """Rollout of one micro-batch of ``batch_size`` and its backward pass, each sample weighted ``1 / total``
        (gradients add up in ``.grad``)."""
        cfg = self.config
        B = cfg.batch_size
        self.process.prepare_batch(B, gen)
        cond = self.batch_condition()
        x_T, kl_init = self.draw_initial_noise(B, gen, cond)
        traj = self.sampler.rollout(x_T, gen)
        step_cond = self.step_condition() if value_gradient is not None else None
        if step_cond is not None:
            value_gradient = functools.partial(value_gradient, condition=step_cond)
        r, grad_x0 = self.reward_and_gradient(traj.samples)
        regression_loss = None
        if cfg.drift_objective in ("adjoint_matching", "value_guided"):
            regression_loss = adjoint_matching_backward(self.sampler, traj, grad_x0, cfg.alpha, 1.0 / total,
                                                        value_gradient, cfg.regression_weight_power,
                                                        self._trained_timesteps(gen)).mean().item()
        else:
            ref = None if reference_kl_weight is None else reference_kl_weight / total
            self.sampler.backpropagate(traj, -grad_x0 / total, cfg.alpha / total, reference_kl_weight=ref,
                                       step_weight_power=getattr(cfg, "regression_weight_power", 0.0))
        return {"reward": r, "kl": traj.kl, "kl_init": kl_init, "ref_kl": traj.ref_kl,
                "regression_loss": regression_loss, "trajectory": traj}

    def _trained_timesteps(self, gen) -> list[int] | None:
        """``train_timestep_fraction < 1``: the random stochastic steps whose regression terms this micro-batch
        trains (at least one), drawn from ``gen``; ``None``: every step."""
        fraction = getattr(self.config, "train_timestep_fraction", 1.0)
        if fraction >= 1:
            return None
        stochastic = self.sampler.schedule.random_steps()
        m = max(1, round(fraction * len(stochastic)))
        picks = torch.randperm(len(stochastic), generator=gen)[:m]
        return sorted(stochastic[int(i)] for i in picks)

    def _gradients_finite(self, params, reward: torch.Tensor) -> bool:
        """False (and counted) when a LoRA gradient is NaN / inf: the step is then skipped, so non-finite values
        never reach the weights. ``max_nonfinite_steps`` such steps in a row raise ``FloatingPointError``."""
        if all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
            self._nonfinite_in_row = 0
            return True
        self.skipped_steps += 1
        self._nonfinite_in_row += 1
        limit = self.config.max_nonfinite_steps
        finite_reward = bool(torch.isfinite(reward).all())
        if self._nonfinite_in_row >= limit:
            raise FloatingPointError(
                f"the gradient of the LoRA parameters was non-finite (NaN / inf) in {self._nonfinite_in_row} drift "
                f"steps in a row (max_nonfinite_steps={limit}); the reward values were "
                f"{'finite' if finite_reward else 'NOT finite'}, so look at the reward's gradient "
                f"({self.reward_name!r}), the learning rate and the precision settings. No non-finite weights were "
                "applied or saved.")
        return False


def logged_kls(out: dict) -> tuple[float, float, dict]:
    """``(KL to the pretrained chain, KL to the reference chain, extra metrics)`` of a :meth:`drift_iteration` with a
    reference: the exact re-evaluation's where the KL passes were half precision (the training passes' values then
    go in the extra metrics), else the training passes'."""
    kl, ref = out["kl"].mean().item(), out["ref_kl"].mean().item()
    if out.get("kl_exact") is None:
        return kl, ref, {}
    return out["kl_exact"].mean().item(), out["ref_kl_exact"].mean().item(), {
        "train/kl_pretrained_in_training_precision": kl, "train/kl_previous_in_training_precision": ref}


__all__ = ["DriftIterations", "logged_kls"]
