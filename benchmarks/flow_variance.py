"""Does the flow-matching chain keep the data's variance at the step counts people run? (docs/algorithms.md §11)

Gaussian data ``N(0.3, std^2 I)`` in 2-D, its exact velocity (``tasks.gaussian_mixture.exact_velocity``), start
``N(0, I)``; for each setting the final sample variance divided by the data variance, for

* ``exact``: the library's pretrained chain (:class:`~hf_control_ft.core.flow_matching.FlowMatchSchedule`);
* ``euler_maruyama``: the Euler-Maruyama step of the flow SDE ``sigma_s = eta sqrt(2 s / (1 - s))`` that
  GRPO-style trainers use and this library used before (first step at the level of its end, every step noisy),
  written out here only as the comparison;
* ``ode``: diffusers' deterministic Euler step ``x' = x + (s' - s) v``.

    python benchmarks/flow_variance.py                 # the table of docs/measurements.md (about 1 min on 2 CPU cores)
    python benchmarks/flow_variance.py --quick         # smoke test

Prints one JSON object per setting, then a summary.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from hf_control_ft.core.flow_matching import FlowMatchSchedule
from hf_control_ft.core.sampler import ControlledSampler
from hf_control_ft.tasks.gaussian_mixture import ExactVelocity, GaussianMixture, exact_velocity


def _velocity(mixture, x, s):
    return exact_velocity(mixture, x, torch.full((x.shape[0],), float(s)))


def euler_maruyama(mixture, levels, eta, x, g):
    """The former sampler: reverse flow SDE, one Euler-Maruyama step per interval."""
    for k in range(len(levels) - 1):
        s, s_next = float(levels[k]), float(levels[k + 1])
        ds = s_next - s
        s_noise = s_next if s >= 1.0 else s  # sigma is infinite at s = 1: the first step used the level at its end
        sigma2 = eta**2 * 2 * s_noise / (1 - s_noise)
        v = _velocity(mixture, x, s)
        x = x + ds * (v + sigma2 / (2 * s) * (x + (1 - s) * v)) + math.sqrt(sigma2 * abs(ds)) * torch.randn(
            x.shape, generator=g)
    return x


def ode(mixture, levels, x):
    for k in range(len(levels) - 1):
        x = x + (float(levels[k + 1]) - float(levels[k])) * _velocity(mixture, x, levels[k])
    return x


def measure(std: float, shift: float, steps: int, eta: float, n: int, seed: int) -> dict:
    mixture = GaussianMixture(weights=[1.0], means=[[0.3, 0.3]], covariances=[[[std**2, 0.0], [0.0, std**2]]])
    schedule = FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(shift=shift), steps, eta)
    levels = torch.cat([schedule.levels, schedule.next_levels[-1:]])
    out = {"std": std, "shift": shift, "steps": steps, "eta": eta}
    g = torch.Generator().manual_seed(seed)
    x_1 = torch.randn(n, 2, generator=g)
    exact = ControlledSampler(ExactVelocity(mixture), schedule).rollout(x_1, g, controlled=False).samples
    with torch.no_grad():
        em = euler_maruyama(mixture, levels, eta, x_1, g)
        det = ode(mixture, levels, x_1)
    for name, x in (("exact", exact), ("euler_maruyama", em), ("ode", det)):
        out[name] = round(float(x.double().var(0).mean()) / std**2, 4)
        out[f"{name}_mean_error"] = round(float((x.double().mean(0) - 0.3).abs().max()), 4)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="two settings, 2000 samples")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    grid = [(0.1, 3.0, K, eta) for K in (10, 28, 50, 1000) for eta in (1.0, 0.5)]
    grid += [(0.5, 1.0, K, eta) for K in (10, 28) for eta in (1.0, 0.5)]
    n = args.samples
    if args.quick:
        grid, n = grid[:2], 2000
    rows = []
    for std, shift, K, eta in grid:
        rows.append(measure(std, shift, K, eta, n, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    # the test's bound: exact within a factor 2 below min(ode, 1) and never above max(ode, 1) by more than 10 %
    print(json.dumps({"samples": n, "worst_exact_over_max_ode_1": max(r["exact"] / max(r["ode"], 1.0) for r in rows),
                      "worst_exact_over_min_ode_1": min(r["exact"] / min(r["ode"], 1.0) for r in rows)}))


if __name__ == "__main__":
    main()
