"""Stage 1: the value function at the start of sampling, by Feynman--Kac regression.

    v_T(x) = alpha * log E_pre[ exp(r(x_0) / alpha) | x_T = x ]

is the soft-optimal value of starting the pretrained chain at ``x``. From pairs ``(x_T, r(x_0))`` of
pretrained rollouts we fit it with the exponential (Bregman) loss in normalised units

    z = (r - c) / alpha,   u(x) = (v(x) - c) / alpha,   loss(u) = E[ exp(z - u(x)) + u(x) ],

whose minimiser is exactly ``u = log E[exp(z) | x]`` (set its derivative ``-E[exp(z - u)] + 1`` to 0). The shift
``c = alpha * log mean exp(r / alpha)`` makes ``u = 0`` the best constant, so the zero-initialised network
starts at the right level, and the exponent is continued linearly above 30 so that no ``r / alpha`` can
overflow: large rewards or small alphas give a finite loss and gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .networks import FieldNetwork

_EXP_CAP = 30.0


def safe_exp(d: torch.Tensor, cap: float = _EXP_CAP) -> torch.Tensor:
    """``exp(d)`` for ``d <= cap``, continued linearly (value and slope match) above: never overflows."""
    capped = d.clamp(max=cap)
    return torch.exp(capped) * (1 + (d - capped))


def soft_value_shift(rewards: torch.Tensor, alpha: float) -> float:
    """``c = alpha * log mean exp(r / alpha)``, computed stably."""
    r = rewards.double() / alpha
    return float(alpha * (torch.logsumexp(r, 0) - math.log(r.numel())))


class ValueFunction(nn.Module):
    """``v_T(x) = c + alpha * u(x)`` with ``u`` a small network on ``sample_shape``.

    Args:
        sample_shape: shape of one sample.
        alpha: KL weight of the objective (the value's temperature).
        hidden, depth: network size.
    """

    def __init__(self, sample_shape, alpha: float, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.alpha = float(alpha)
        self.net = FieldNetwork(sample_shape, out="scalar", hidden=hidden, depth=depth)
        self.register_buffer("shift", torch.zeros(()))

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """``u(x) = (v(x) - c) / alpha``, ``(B,)``."""
        return self.net(x, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``v_T(x)`` in reward units, ``(B,)``."""
        return self.shift + self.alpha * self.normalized(x)

    def fit(self, x_T: torch.Tensor, rewards: torch.Tensor, steps: int = 500, lr: float = 1e-3,
            batch_size: int = 1024, generator: torch.Generator | None = None, progress: bool = True) -> float:
        """Fits on pairs ``x_T`` ``(N, *shape)``, ``rewards`` ``(N,)``; returns the final mean loss."""
        rewards = rewards.detach().to(x_T.device).float()
        self.shift.fill_(soft_value_shift(rewards, self.alpha))
        z = (rewards - self.shift) / self.alpha
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        n = x_T.shape[0]
        last = float("nan")
        for _ in tqdm(range(steps), desc="value function", disable=not progress):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(x_T.device)
            u = self.normalized(x_T[idx])
            loss = (safe_exp(z[idx] - u) + u).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss.item()
        return last
