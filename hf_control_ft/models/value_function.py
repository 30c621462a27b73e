"""Stage 1: the value function at the start of sampling, by Feynman--Kac regression.

    v_T(x) = alpha * log E_pre[ exp(r(x_0) / alpha) | x_T = x ]

is the soft-optimal value of starting the pretrained chain at ``x``. From pairs ``(x_T, r(x_0))`` of
pretrained rollouts we fit it with the exponential (Bregman) loss in normalised units

    z = (r - c) / alpha,   u(x) = (v(x) - c) / alpha,   loss(u) = E[ exp(z - u(x)) + u(x) ],

whose minimiser is exactly ``u = log E[exp(z) | x]`` (set its derivative ``-E[exp(z - u)] + 1`` to 0). The shift
``c = alpha * log mean exp(r / alpha)`` makes ``u = 0`` the best constant, so the zero-initialised network
starts at the right level, and the exponent is continued linearly above 30 so that no ``r / alpha`` can
overflow: large rewards or small alphas give a finite loss and gradient.

**Output scale.** The network predicts ``v`` in units of the reward's spread ``s_r`` (the standard deviation of
the observed rewards): ``v(x) = c + s_r * f(x)``, so ``u = (s_r / alpha) * f``. A network whose output had to
reach ``(v - c) / alpha`` directly could not get there from a zero-initialised last layer when ``s_r / alpha``
is large (small alpha): at ``s_r / alpha = 100`` it fitted a slope of 0.08 where the exact one is 1, and stage 2
then learns about ``N(0, I)``. With the scale, ``f`` has unit size at any alpha (``tests`` check the fitted
slope at ``s_r / alpha`` in {1, 10, 100}). :func:`check_value_range` warns when the fitted ``v`` is nearly flat
although ``r / alpha`` spreads widely.

**Held-out check.** The regression target ``exp(z)`` of one rollout is a very noisy estimate of its
conditional mean, and a network on a large sample can memorise a few hundred of them (the training loss then
heads for its floor ``1 + mean z``). :meth:`ValueFunction.fit` therefore fits once on four fifths of the
rollouts and scores that fit on the rest against the constant value. A fit that does worse than the constant
is discarded and the value kept constant: stage 2 then leaves the start law at ``N(0, I)`` instead of spending
KL on noise. Otherwise the value is fitted on all rollouts, exactly as without the check.

**Warm start.** When ``s_r / alpha`` is large, ``z`` spans hundreds of units and the exponential loss is
dominated by the few largest ``z`` of each batch: from ``f = 0`` the fit did not recover even a noiseless linear
reward (slope -0.4 for an exact 1 at ``s_r / alpha = 100``). The first ``WARM_START_FRACTION`` of the steps
therefore fit ``f`` by least squares to ``(r - c) / s_r`` (the conditional mean of the reward, which has the
right shape whenever the reward's conditional spread is small against its range); the remaining steps
minimise the exponential loss from there, which moves the fit to ``alpha log E[exp(r / alpha) | x]``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .networks import FieldNetwork

logger = logging.getLogger(__name__)

_EXP_CAP = 30.0


def safe_exp(d: torch.Tensor, cap: float = _EXP_CAP) -> torch.Tensor:
    """``exp(d)`` for ``d <= cap``, continued linearly (value and slope match) above: never overflows."""
    capped = d.clamp(max=cap)
    return torch.exp(capped) * (1 + (d - capped))


WARM_START_FRACTION = 0.3
VALIDATION_FRACTION = 0.2  # of the rollouts, held out to check the fit against a constant (ValueFunction.fit)
MIN_VALIDATION = 32  # fewer held-out pairs than this: no check, the plain fit
HELD_OUT_TOLERANCE = 0.1  # exponential-loss units (the constant scores about 1)


def value_regression_loss(f: torch.Tensor, rewards: torch.Tensor, shift, scale, alpha: float,
                          warm_start: bool) -> torch.Tensor:
    """Mean loss of the scaled value output ``f`` (``v = shift + scale * f``) on ``rewards`` (both ``(B,)``).

    ``warm_start``: least squares of ``v`` to ``r`` in units of ``scale``; else the exponential (Bregman) loss
    ``exp(z - u) + u`` with ``z = (r - shift) / alpha``, ``u = scale * f / alpha`` (module docstring).
    """
    if warm_start:
        return (f - (rewards - shift) / scale).pow(2).mean()
    u = (scale / alpha) * f
    z = (rewards - shift) / alpha
    return (safe_exp(z - u) + u).mean()


def exp_phase_lr_factor(scale: float, alpha: float) -> float:
    """Learning-rate factor of the exponential phase: ``min(1, alpha / s_r)``. A change ``df`` of the network
    output moves ``u`` by ``(s_r / alpha) df``, so without it a small alpha would take proportionally larger
    steps in ``u``, where the exponential loss's curvature ``exp(z - u)`` makes them unstable."""
    return min(1.0, alpha / scale)


def reward_scale(rewards: torch.Tensor) -> float:
    """``s_r``: the standard deviation of the rewards (1e-6 relative floor, 1 for a constant reward)."""
    r = rewards.double()
    std = float(r.std()) if r.numel() > 1 else 0.0
    floor = 1e-6 * max(float(r.abs().max()), 1e-12) if r.numel() else 1.0
    return std if std > floor else 1.0


def check_value_range(fitted: torch.Tensor, rewards: torch.Tensor, alpha: float, name: str,
                      ratio: float = 0.02) -> bool:
    """Warns (and returns True) when the fitted values spread less than ``ratio`` times ``r`` while ``r / alpha``
    spreads over more than one unit: the signature of a value fit that did not converge (or of a start that the
    sampler forgets, where a flat value is right: eta = 1 with many steps)."""
    spread_v = float(fitted.double().std()) if fitted.numel() > 1 else 0.0
    spread_r = float(rewards.double().std()) if rewards.numel() > 1 else 0.0
    if spread_r / alpha > 1.0 and spread_v < ratio * spread_r:
        logger.warning(
            "%s: the fitted values spread %.3g (std) while the rewards spread %.3g = %.3g alpha; the value is "
            "nearly flat. That is right only if the sampler forgets its start (eta = 1, many steps); otherwise "
            "raise the value fit's steps or learning rate", name, spread_v, spread_r, spread_r / alpha)
        return True
    return False


def soft_value_shift(rewards: torch.Tensor, alpha: float) -> float:
    """``c = alpha * log mean exp(r / alpha)``, computed stably."""
    r = rewards.double() / alpha
    return float(alpha * (torch.logsumexp(r, 0) - math.log(r.numel())))


class ValueFunction(nn.Module):
    """``v_T(x) = c + s_r * f(x) = c + alpha * u(x)`` with ``f`` a small network on ``sample_shape``.

    Args:
        sample_shape: shape of one sample.
        alpha: KL weight of the objective (the value's temperature).
        hidden, depth: network size.
    """

    def __init__(self, sample_shape, alpha: float, hidden: int = 128, depth: int = 3, cond_dim: int = 0):
        super().__init__()
        self.alpha = float(alpha)
        self.net = FieldNetwork(sample_shape, out="scalar", hidden=hidden, depth=depth, cond_dim=cond_dim)
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))  # s_r, reward units
        self.validation: dict | None = None  # the last fit's held-out check: scores and choice (fit)

    def normalized(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``u(x) = (v(x) - c) / alpha``, ``(B,)`` (``condition`` ``(B, cond_dim)`` for a conditional value)."""
        return (self.scale / self.alpha) * self.net(x, 0.0, condition)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``v_T(x)`` (or ``v_T(x, c)``) in reward units, ``(B,)``."""
        return self.shift + self.alpha * self.normalized(x, condition)

    def fit(self, x_T: torch.Tensor, rewards: torch.Tensor, steps: int = 500, lr: float = 1e-3,
            batch_size: int = 1024, generator: torch.Generator | None = None, progress: bool = True,
            conditions: torch.Tensor | None = None, validation_fraction: float = VALIDATION_FRACTION) -> float:
        """Fits on pairs ``x_T`` ``(N, *shape)``, ``rewards`` ``(N,)`` (and ``conditions`` ``(N, cond_dim)`` for a
        conditional value); returns the final mean training loss.

        **Held-out check** (``validation_fraction`` of the pairs, at least :data:`MIN_VALIDATION` of them): a first
        fit on the other pairs is scored by the exponential loss on the held-out ones against the constant value
        (``f = 0``). With few rollouts of a large sample and a noisy reward the network memorises its pairs (on the
        digits task, 512 rollouts of 64 pixels: held-out loss 1e6 against 1.04 for the constant) and stage 2 would
        spend KL chasing that noise; a fit worse than the constant by more than :data:`HELD_OUT_TOLERANCE` is
        therefore replaced by the constant (the start law then stays where the KL term holds it, ``N(0, I)``),
        with a warning. Otherwise the value is fitted on all pairs exactly as without the check (same
        initialisation and batch stream). :attr:`validation` records the scores and the choice.
        """
        rewards = rewards.detach().to(x_T.device).float()
        n = x_T.shape[0]
        n_val = int(validation_fraction * n)
        self.validation = {"held_out": 0, "kept_fit": True}
        if n_val >= MIN_VALIDATION:
            initial = {k: v.clone() for k, v in self.net.state_dict().items()}
            stream = generator.get_state() if generator is not None else None
            order = torch.randperm(n, generator=torch.Generator().manual_seed(n)).to(x_T.device)
            val, train = order[:n_val], order[n_val:]
            cond = (lambda idx: None) if conditions is None else (lambda idx: conditions[idx])
            self._run(x_T[train], rewards[train], cond(train), steps, lr, batch_size, generator, False)
            fitted = self._held_out_loss(x_T[val], rewards[val], cond(val), batch_size)
            constant = self._constant_loss(rewards[val])
            kept = fitted <= constant + HELD_OUT_TOLERANCE  # False for a NaN score too
            self.validation = {"held_out": n_val, "kept_fit": kept, "held_out_loss": fitted,
                               "constant_held_out_loss": constant}
            self.net.load_state_dict(initial)
            if generator is not None:
                generator.set_state(stream)
            if not kept:
                logger.warning(
                    "start value v_T: the fit does worse than a constant on %d held-out rollouts (exponential loss "
                    "%.3g against %.3g): it memorised its rollouts, so the value is kept constant and the learned "
                    "start law stays N(0, I). More rollouts (value_num_rollouts) give it something to learn",
                    n_val, fitted, constant)
        last = self._run(x_T, rewards, conditions, steps if self.validation["kept_fit"] else 0, lr, batch_size,
                         generator, progress)
        if self.validation["kept_fit"]:
            with torch.no_grad():
                probe = x_T[:4096]
                c = None if conditions is None else conditions[:4096]
                check_value_range(self(probe, c), rewards[:4096], self.alpha, "stage 1 value v_T")
        return last

    def _run(self, x_T, rewards, conditions, steps: int, lr: float, batch_size: int, generator,
             progress: bool) -> float:
        """The fit: least-squares warm start, then the exponential loss; returns the last training loss (with
        ``steps = 0``, the constant's: ``mean exp((r - c) / alpha) = 1``)."""
        self.shift.fill_(soft_value_shift(rewards, self.alpha))
        self.scale.fill_(reward_scale(rewards))
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        n = x_T.shape[0]
        warm_steps = int(WARM_START_FRACTION * steps)
        last = self._constant_loss(rewards)
        for it in tqdm(range(steps), desc="value function", disable=not progress):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(x_T.device)
            if it == warm_steps:
                for group in opt.param_groups:
                    group["lr"] = lr * exp_phase_lr_factor(float(self.scale), self.alpha)
            c = None if conditions is None else conditions[idx]
            loss = value_regression_loss(self.net(x_T[idx], 0.0, c), rewards[idx], self.shift, self.scale, self.alpha,
                                         warm_start=it < warm_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss.item()
        return last

    def _constant_loss(self, rewards: torch.Tensor) -> float:
        """Exponential loss of the constant value ``f = 0`` at the current level ``c``: ``mean exp((r - c) /
        alpha)`` (1 on the pairs ``c`` was fitted on)."""
        return float(value_regression_loss(torch.zeros_like(rewards), rewards, self.shift, self.scale, self.alpha,
                                           warm_start=False))

    @torch.no_grad()
    def _held_out_loss(self, x, rewards, conditions, batch_size: int) -> float:
        """Mean exponential loss of the current fit on held-out pairs, at the level ``c`` of the training pairs."""
        total = 0.0
        for idx in torch.arange(x.shape[0], device=x.device).split(batch_size):
            f = self.net(x[idx], 0.0, None if conditions is None else conditions[idx])
            total += float(value_regression_loss(f, rewards[idx], self.shift, self.scale, self.alpha,
                                                 warm_start=False)) * len(idx)
        return total / x.shape[0]
