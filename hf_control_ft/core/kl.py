"""Exact KL and log-density of Gaussian transitions, summed over every dimension.

Units: nats per sample. Every function sums over all non-batch dimensions; averaging over dimensions would
silently rescale ``alpha`` by the dimension count (``docs/algorithms.md`` §2).
"""

from __future__ import annotations

import math

import torch


def _sum_non_batch(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """``KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) = ||mean_p - mean_q||^2 / (2 std^2)``.

    Args:
        mean_p, mean_q: ``(B, *shape)`` means.
        std: positive scalar standard deviation shared by both Gaussians.

    Returns:
        ``(B,)`` KL per sample, summed over all dimensions of ``shape``.
    """
    return difference_kl(mean_p - mean_q, std)


def difference_kl(difference: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """:func:`gaussian_kl` from the difference of the means ``(B, *shape)``: ``||difference||^2 / (2 std^2)``,
    ``(B,)`` nats (the form the difference-propagation passes give it, :mod:`hf_control_ft.core.difference`)."""
    std = float(std)
    if std <= 0:
        raise ValueError(f"gaussian_kl needs std > 0, got {std}")
    return _sum_non_batch(difference.pow(2)) / (2.0 * std * std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, std^2 I)`` per sample, ``(B,)``, summed over all dimensions."""
    std = float(std)
    if std <= 0:
        raise ValueError(f"gaussian_log_prob needs std > 0, got {std}")
    d = x[0].numel()
    sq = _sum_non_batch((x - mean).pow(2))
    return -sq / (2 * std * std) - d * (math.log(std) + 0.5 * math.log(2 * math.pi))
