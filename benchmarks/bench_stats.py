"""Statistics shared by the benchmarks: the mean over seeds and its Student-t interval."""

from __future__ import annotations

import math


def interval(values: list[float]) -> dict:
    """Mean and two-sided 95% Student-t interval of the mean over seeds (``None`` bounds for one value)."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95_low": None, "ci95_high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "n": n}
