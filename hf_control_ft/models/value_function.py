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

    def normalized(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``u(x) = (v(x) - c) / alpha``, ``(B,)`` (``condition`` ``(B, cond_dim)`` for a conditional value)."""
        return (self.scale / self.alpha) * self.net(x, 0.0, condition)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``v_T(x)`` (or ``v_T(x, c)``) in reward units, ``(B,)``."""
        return self.shift + self.alpha * self.normalized(x, condition)

    def fit(self, x_T: torch.Tensor, rewards: torch.Tensor, steps: int = 500, lr: float = 1e-3,
            batch_size: int = 1024, generator: torch.Generator | None = None, progress: bool = True,
            conditions: torch.Tensor | None = None) -> float:
        """Fits on pairs ``x_T`` ``(N, *shape)``, ``rewards`` ``(N,)`` (and ``conditions`` ``(N, cond_dim)`` for a
        conditional value); returns the final mean loss."""
        rewards = rewards.detach().to(x_T.device).float()
        self.shift.fill_(soft_value_shift(rewards, self.alpha))
        self.scale.fill_(reward_scale(rewards))
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        n = x_T.shape[0]
        warm_steps = int(WARM_START_FRACTION * steps)
        last = float("nan")
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
        with torch.no_grad():
            probe = x_T[:4096]
            c = None if conditions is None else conditions[:4096]
            check_value_range(self(probe, c), rewards[:4096], self.alpha, "stage 1 value v_T")
        return last
