"""Validation of what a reward function returns: the trainer never optimises a malformed reward silently."""

from __future__ import annotations

import torch


def reward_name(reward_fn) -> str:
    return getattr(reward_fn, "__name__", None) or type(reward_fn).__name__


def check_reward(values, batch_size: int, name: str, require_grad: bool = False) -> torch.Tensor:
    """Checks a reward output and returns it.

    Args:
        values: what the reward returned; must be a float tensor of shape ``(batch_size,)``.
        batch_size: number of samples given to the reward.
        name: the reward's name, used in every error.
        require_grad: the trainer backpropagates through it, so it must carry a ``grad_fn``.

    Raises:
        TypeError / ValueError naming the reward and the problem (type, shape, NaN/inf, no gradient).
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"reward {name!r} returned {type(values).__name__}; expected a torch.Tensor of shape "
                        f"({batch_size},)")
    if tuple(values.shape) != (batch_size,):
        raise ValueError(f"reward {name!r} returned shape {tuple(values.shape)}; expected ({batch_size},) "
                         "(one value per sample)")
    if not values.is_floating_point():
        raise TypeError(f"reward {name!r} returned dtype {values.dtype}; expected a floating-point tensor")
    bad = ~torch.isfinite(values.detach())
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        n_nan = int(torch.isnan(values.detach()).sum())
        raise ValueError(f"reward {name!r} returned {len(idx)} non-finite values ({n_nan} NaN, "
                         f"{len(idx) - n_nan} inf) at batch indices {idx[:10]}")
    if require_grad and not values.requires_grad:
        raise ValueError(f"reward {name!r} is not differentiable: its output has no grad_fn, but ELEGANT "
                         "backpropagates through the reward (compute it with torch ops on the input samples)")
    return values
