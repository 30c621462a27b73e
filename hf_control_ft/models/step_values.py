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

Memory: the fit keeps ``m`` states of each of the ``N`` rollouts (``N * m`` samples; ``m = K`` keeps them all).
The states of one rollout are strongly correlated, so a few random steps per rollout carry most of what all ``K``
carry: the regression pairs ``(x_k, r(x_K))`` stay unbiased for any choice of steps that does not look at the
rollout (``ElegantConfig.step_value_states_per_rollout``).
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

    def fit(self, states, rewards: torch.Tensor, steps: int = 2000, lr: float = 1e-3, batch_size: int = 1024,
            generator: torch.Generator | None = None, progress: bool = True,
            conditions: torch.Tensor | None = None, step_index: torch.Tensor | None = None) -> float:
        """Fits on pretrained rollouts; returns the final mean loss.

        Args:
            states: every step of every rollout, ``K`` tensors ``(N, *shape)`` (``states[k]`` holds ``x_k``);
                or, with ``step_index``, a subset: ``(N, m, *shape)``, ``states[n, j]`` being rollout ``n``'s state
                at step ``step_index[n, j]``.
            rewards: ``(N,)`` ``r(x_K)`` of every rollout.
            conditions: ``(N, cond_dim)`` the rollouts' conditions, for a conditional value.
            step_index: ``(N, m)`` long, the steps of a stored subset (``None``: ``states`` holds all ``K``).
        """
        K = len(self.times)
        if step_index is None:
            if len(states) != K:
                raise ValueError(f"got states for {len(states)} steps, the value function has {K} step times")
            x_all, step_index = select_states(states, K)  # (N, K, *shape), every step in order
        else:
            x_all = states.detach()
            if tuple(step_index.shape) != tuple(x_all.shape[:2]) or int(step_index.max()) >= K:
                raise ValueError(f"step_index {tuple(step_index.shape)} must be (N, m) with steps < {K} for states "
                                 f"{tuple(x_all.shape)}")
        N, m = x_all.shape[:2]
        step_index = step_index.to(x_all.device)
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
                j = torch.randint(0, m, (batch_size,), generator=generator).to(x_all.device)
                n = torch.randint(0, N, (batch_size,), generator=generator).to(x_all.device)
                k = step_index[n, j]
                f = self.net(x_all[n, j], self._time(k), None if conditions is None else conditions[n])
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
            first = step_index[:4096, 0]  # each rollout's first stored step
            check_value_range(self(x_all[:4096, 0], first, c), rewards[:4096], self.alpha, "step values")
        return last


def select_states(states: list, m: int, generator: torch.Generator | None = None):
    """The states a per-step value fit keeps of a batch of rollouts: ``(x, steps)`` with ``x`` ``(B, m, *shape)``
    and ``steps`` ``(B, m)`` long (CPU). ``states``: ``K`` tensors ``(B, *shape)``, one per step. With
    ``generator`` each rollout keeps ``m`` distinct random steps; without, all ``K`` in order (``m`` must be
    ``K``)."""
    K, B = len(states), states[0].shape[0]
    stacked = torch.stack([s.detach() for s in states], dim=1)  # (B, K, *shape): one batch's trajectory
    if generator is None:
        if m != K:
            raise ValueError(f"keeping {m} of {K} steps needs a generator to pick them")
        return stacked, torch.arange(K).expand(B, K)
    steps = torch.rand(B, K, generator=generator).argsort(dim=1)[:, :m]
    return stacked[torch.arange(B)[:, None], steps.to(stacked.device)], steps
