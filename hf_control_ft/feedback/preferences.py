"""Pairwise preferences to values: the Bradley–Terry model on one scale across rounds (``docs/algorithms.md`` §12).

A rater shown samples ``i`` and ``j`` prefers ``i`` with probability ``sigma(v_i - v_j)``; values are in logits (a
difference of 1 is a preference of 73 % to 27 %). Every query belongs to a *group* (its SEIKO round). The values of
all rounds are fitted together, as the maximum a-posteriori estimate of

    v_i ~ N(mu_{g(i)}, tau^2)           (a query's value around its round's level)
    mu_g ~ N(0, sigma_mu^2),  mu of the first group = 0     (round levels: free but for a weak prior)

from every comparison so far, those across rounds included. The first group fixes the origin; a later round's
level ``mu_g`` is measured by its comparisons with earlier rounds' queries (the rating page pairs each new query
with one of them), so a round whose samples are 3 logits better *is* 3 logits higher, instead of being centred
on 0 like every round fitted alone. Within a round a query's value is shrunk toward the round's level by the prior
``tau`` (default 1.5 logits) -- how much is the data's business: ``benchmarks/pairwise_scale.py`` measures the
fitted-against-true slope at 1 / 2 / 4 / 8 comparisons per query. The log-posterior is concave; it is maximised
with L-BFGS in float64.
"""

from __future__ import annotations

import math

import torch

#: prior standard deviation of a query's value around its round's level, in logits: the start of its estimate
PRIOR_SCALE = 1.0
#: the estimate's floor (one comparison per query cannot tell a small spread from noise)
MIN_PRIOR_SCALE = 0.5
#: prior standard deviation of a round's level (weak: the comparisons across rounds decide it)
LEVEL_SCALE = 10.0


def bradley_terry(num_items: int, comparisons: list[tuple[int, int, float]], groups: list[int] | None = None,
                  prior_scale: float | None = None, level_scale: float = LEVEL_SCALE, rounds: int = 30,
                  iterations: int = 200, tol: float = 1e-9) -> list[float]:
    """Values ``v`` (logits) of ``num_items`` items from ``(i, j, y)`` comparisons, ``y = 1`` when ``i`` was
    preferred to ``j`` and ``0`` when ``j`` was (``0.5``: a tie counts half a win each); module docstring.

    ``groups``: one group label per item (its round; the smallest label is the origin); ``None``: one group.
    ``prior_scale``: ``tau``; ``None`` (default): estimated from the comparisons (``rounds`` EM steps)."""
    if num_items == 0:
        return []
    if groups is not None and len(groups) != num_items:
        raise ValueError(f"{len(groups)} groups for {num_items} items")
    if (prior_scale is not None and not prior_scale > 0) or not level_scale > 0:
        raise ValueError("prior_scale and level_scale must be > 0")
    for i, j, _ in comparisons:
        if i == j or not (0 <= i < num_items and 0 <= j < num_items):
            raise ValueError(f"bad comparison ({i}, {j}) of {num_items} items")
    labels = sorted(set(groups)) if groups is not None else [0]
    group_of = torch.tensor([labels.index(g) for g in groups] if groups is not None else [0] * num_items)
    first = torch.tensor([c[0] for c in comparisons], dtype=torch.long)
    second = torch.tensor([c[1] for c in comparisons], dtype=torch.long)
    y = torch.tensor([float(c[2]) for c in comparisons], dtype=torch.float64)
    values = torch.zeros(num_items, dtype=torch.float64, requires_grad=True)
    levels = torch.zeros(len(labels) - 1, dtype=torch.float64, requires_grad=True)  # the first group's is 0
    tau2 = (prior_scale if prior_scale is not None else PRIOR_SCALE) ** 2
    variance = torch.full((num_items,), tau2, dtype=torch.float64)  # posterior variances (Laplace, diagonal)
    for _ in range(rounds):
        # the marginal probability of a comparison, E sigma(v_i - v_j) over the values' posterior, in the probit
        # approximation: sigma(d / sqrt(1 + pi (V_i + V_j) / 8)) -- without it the levels of rounds compared
        # through few comparisons per query shrink toward each other
        scale = (1 + math.pi * (variance[first] + variance[second]) / 8) ** -0.5
        _maximise(values, levels, group_of, first, second, y, scale, tau2, level_scale, iterations, tol)
        with torch.no_grad():
            d = (values[first] - values[second]) * scale
            weight = torch.sigmoid(d) * torch.sigmoid(-d) * scale**2
            curvature = torch.full((num_items,), 1 / tau2, dtype=torch.float64)
            curvature.index_add_(0, first, weight).index_add_(0, second, weight)
            new_variance = 1 / curvature
            mu = torch.cat([levels.new_zeros(1), levels])[group_of]
            new_tau2 = tau2 if prior_scale is not None else float(((values - mu) ** 2 + new_variance).mean())
            change = max(float((new_variance - variance).abs().max()), abs(new_tau2 - tau2))
            variance, tau2 = new_variance, max(new_tau2, MIN_PRIOR_SCALE**2)
        if change < 1e-6:
            break
    return values.detach().tolist()


def _maximise(values, levels, group_of, first, second, y, scale, tau2, level_scale, iterations, tol) -> None:
    """L-BFGS on the negative log-posterior with the comparisons' probit scales held fixed (concave)."""

    def loss():
        mu = torch.cat([levels.new_zeros(1), levels])[group_of]
        d = (values[first] - values[second]) * scale
        nll = -(y * torch.nn.functional.logsigmoid(d) + (1 - y) * torch.nn.functional.logsigmoid(-d)).sum()
        return nll + ((values - mu) ** 2).sum() / (2 * tau2) + (levels**2).sum() / (2 * level_scale**2)

    optimizer = torch.optim.LBFGS([values, levels], lr=1.0, max_iter=iterations, tolerance_grad=tol,
                                  tolerance_change=tol * 1e-2, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(closure)


__all__ = ["bradley_terry", "PRIOR_SCALE", "MIN_PRIOR_SCALE", "LEVEL_SCALE"]
