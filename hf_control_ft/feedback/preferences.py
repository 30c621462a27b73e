"""Pairwise preferences to values: the Bradley–Terry model (``docs/algorithms.md``, "People as the oracle").

A rater shown samples ``i`` and ``j`` prefers ``i`` with probability ``sigma(v_i - v_j)``. The values ``v`` of
one round's queries are the maximum a-posteriori estimate under a prior that gives every query one virtual win
and one virtual loss against a reference of value 0: it keeps ``v`` finite when a query won (or lost) every
comparison, and fixes the scale's origin (a query with as many wins as losses against the reference level sits
near 0). Fitted with Hunter's minorise-maximise iteration (2004), which increases the posterior at every step.
Values are in logits: a difference of 1 is a preference of 73 % to 27 %.
"""

from __future__ import annotations

import math


def bradley_terry(num_items: int, comparisons: list[tuple[int, int, float]], iterations: int = 500,
                  tol: float = 1e-10) -> list[float]:
    """Values ``v`` (logits) of ``num_items`` items from ``(i, j, y)`` comparisons, ``y = 1`` when ``i`` was
    preferred to ``j`` and ``0`` when ``j`` was (``0.5``: a tie counts half a win each)."""
    wins = [1.0] * num_items  # the prior's virtual win against the reference
    pairs: dict[tuple[int, int], float] = {}
    for i, j, y in comparisons:
        if i == j or not (0 <= i < num_items and 0 <= j < num_items):
            raise ValueError(f"bad comparison ({i}, {j}) of {num_items} items")
        wins[i] += y
        wins[j] += 1.0 - y
        key = (min(i, j), max(i, j))
        pairs[key] = pairs.get(key, 0.0) + 1.0
    strength = [1.0] * num_items
    for _ in range(iterations):
        denominators = [2.0 / (s + 1.0) for s in strength]  # a virtual win and loss against strength 1
        for (i, j), n in pairs.items():
            d = n / (strength[i] + strength[j])
            denominators[i] += d
            denominators[j] += d
        new = [w / d for w, d in zip(wins, denominators)]
        change = max(abs(math.log(a) - math.log(b)) for a, b in zip(new, strength)) if num_items else 0.0
        strength = new
        if change < tol:
            break
    return [math.log(s) for s in strength]


__all__ = ["bradley_terry"]
