"""Soft values at every sampling step, by Feynman--Kac regression on pretrained rollouts.

    V_k(x) = alpha * log E_pre[ exp(r(x_K) / alpha) | x_k = x ],     k = 0 .. K-1,

generalises stage 1's ``v_T = V_0`` (:mod:`hf_control_ft.models.value_function`) to every state of the chain. Each
pretrained rollout ``x_0 .. x_K`` gives ``K`` pairs ``(x_k, r(x_K))``; one time-conditioned network
``u(x, s_k)`` is fitted with the same exponential (Bregman) loss, whose minimiser is
``u = log E[exp((r - c) / alpha) | x_k]``, so ``V_k = c + alpha * u``. Its input gradient
``grad V_k`` is the Rao--Blackwellised lean adjoint: ``grad V_k(x) = E_{Q*}[a_k | x_k = x]`` under the tilted
path law (:mod:`hf_control_ft.core.adjoint_matching`), without the heavy tail of single-path adjoints.

The network predicts in units of the reward's spread with a least-squares warm start and a reduced learning
rate in the exponential phase, exactly as stage 1 (:mod:`hf_control_ft.models.value_function`, "Output scale" and
"Warm start"), so the fit holds at small alpha.

Memory: the fit keeps the rollouts' states (``N * K`` samples); for large samples keep ``N`` small or
subsample steps (``steps_per_rollout``).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .networks import FieldNetwork
from .value_function import (
    WARM_START_FRACTION,
    check_value_range,
    exp_phase_lr_factor,
    reward_scale,
    soft_value_shift,
    value_regression_loss,
)


class StepValueFunction(nn.Module):
    """``V_k(x) = c + alpha * u(x, s_k)``, ``s_k = timesteps[k] / num_train_timesteps`` in ``[0, 1]``.

    Args:
        sample_shape: shape of one sample.
        alpha: KL weight of the objective (the value's temperature).
        times: ``(K,)`` the steps' times ``s_k`` (highest noise first).
        hidden, depth: network size.
    """

    def __init__(self, sample_shape, alpha: float, times: torch.Tensor, hidden: int = 128, depth: int = 3,
                 cond_dim: int = 0):
        super().__init__()
        self.alpha = float(alpha)
        self.net = FieldNetwork(sample_shape, out="scalar", hidden=hidden, depth=depth, cond_dim=cond_dim)
        self.register_buffer("times", torch.as_tensor(times, dtype=torch.float32).clone())
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))  # s_r, reward units

    def _time(self, k):
        return self.times[k] if isinstance(k, int) else self.times[k.to(self.times.device)]

    def normalized(self, x: torch.Tensor, k, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``u(x, s_k) = (V_k(x) - c) / alpha``, ``(B,)``; ``k`` an int or a ``(B,)`` long tensor."""
        return (self.scale / self.alpha) * self.net(x, self._time(k), condition)

    def forward(self, x: torch.Tensor, k, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``V_k(x)`` (or ``V_k(x, c)``) in reward units, ``(B,)``."""
        return self.shift + self.alpha * self.normalized(x, k, condition)

    def gradient(self, x: torch.Tensor, k: int, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``grad_x V_k(x)``, detached, shape of ``x``."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.normalized(x, k, condition).sum(), x)
        return self.alpha * g

    def fit(self, states: list, rewards: torch.Tensor, steps: int = 2000, lr: float = 1e-3, batch_size: int = 1024,
            generator: torch.Generator | None = None, progress: bool = True,
            conditions: torch.Tensor | None = None) -> float:
        """Fits on pretrained rollouts; returns the final mean loss.

        Args:
            states: ``K`` tensors ``(N, *shape)``: ``states[k]`` holds ``x_k`` of every rollout.
            rewards: ``(N,)`` ``r(x_K)`` of every rollout.
            conditions: ``(N, cond_dim)`` the rollouts' conditions, for a conditional value.
        """
        K, N = len(states), rewards.shape[0]
        if K != len(self.times):
            raise ValueError(f"got states for {K} steps, the value function has {len(self.times)} step times")
        x_all = torch.stack([s.detach() for s in states])  # (K, N, *shape)
        rewards = rewards.detach().to(x_all.device).float()
        self.shift.fill_(soft_value_shift(rewards, self.alpha))
        self.scale.fill_(reward_scale(rewards))
        warm_steps = int(WARM_START_FRACTION * steps)
        # two phases, each with its own Adam + cosine schedule: least squares, then the exponential loss at a
        # learning rate scaled by min(1, alpha / s_r)
        phases = [(warm_steps, lr, True), (steps - warm_steps, lr * exp_phase_lr_factor(float(self.scale), self.alpha),
                                           False)]
        last = float("nan")
        bar = tqdm(total=steps, desc="step values", disable=not progress)
        for n_steps, phase_lr, warm in phases:
            if n_steps <= 0:
                continue
            opt = torch.optim.Adam(self.net.parameters(), lr=phase_lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_steps)
            for _ in range(n_steps):
                k = torch.randint(0, K, (batch_size,), generator=generator).to(x_all.device)
                n = torch.randint(0, N, (batch_size,), generator=generator).to(x_all.device)
                f = self.net(x_all[k, n], self._time(k), None if conditions is None else conditions[n])
                loss = value_regression_loss(f, rewards[n], self.shift, self.scale, self.alpha, warm_start=warm)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                last = loss.item()
                bar.update(1)
        bar.close()
        self.requires_grad_(False)
        with torch.no_grad():
            c = None if conditions is None else conditions[:4096]
            check_value_range(self(x_all[0, :4096], 0, c), rewards[:4096], self.alpha, "step values V_0")
        return last
