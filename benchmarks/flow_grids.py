"""Which steps of the flow grids people run are deterministic, and where control ends (docs/algorithms.md §11).

For SD3-style grids (the scheduler's own, ``shift`` 1 and 3) and FLUX.1's dynamic-shift grid (512 and 1024 px) at
1-200 steps: the deterministic steps, the noise level where the controlled chain's control ends, and the largest
KL factor of a random step at ``eta`` 1 and 0.5 -- with the library's rule and, for comparison, with the rule it
replaced (a step is deterministic only if ``s' = 0`` or ``s' < s / 10``), recomputed here from the same grid.

    python benchmarks/flow_grids.py          # one JSON line per grid (a second on a CPU)
"""

from __future__ import annotations

import json

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from hf_control_ft.core.flow_matching import JUMP_RATIO, FlowMatchSchedule

STEPS = (1, 2, 3, 4, 10, 28, 36, 40, 50, 100, 112, 200)


def grids():
    """``(name, K, kwargs of FlowMatchSchedule)`` for every grid measured."""
    for shift in (3.0, 1.0):
        for K in STEPS:
            yield f"sd3-shift{shift:g}", K, dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
    for px in (512, 1024):
        mu = calculate_shift((px // 16) ** 2, 256, 4096, 0.5, 1.15)
        for K in STEPS:
            yield f"flux-{px}px", K, dict(scheduler=flux, mu=mu, sigmas=torch.linspace(1, 1 / K, K).tolist())


def old_rule(schedule: FlowMatchSchedule) -> list[int]:
    """The random steps under the replaced rule: every step but ``s' = 0`` and ``s' < s / 10``."""
    s, s_next = schedule.levels, schedule.next_levels
    return [k for k in range(len(schedule)) if float(s_next[k]) > 0 and float(s_next[k]) >= JUMP_RATIO * float(s[k])]


def max_factor(schedule: FlowMatchSchedule, steps: list[int]) -> float | None:
    """The largest KL factor ``(c_v)^2 / (2 sigma^2)`` over ``steps`` (computed from the closed form, so also for
    steps the current rule makes deterministic)."""
    if not steps:
        return None
    s, s_next = schedule.levels[steps], schedule.next_levels[steps]
    r = (1 - s) / (1 - s_next)
    var = (schedule.eta * s_next) ** 2 * (1 - (r * s_next / s) ** 2)
    c = (s_next**2 - var).clamp(min=0).sqrt()
    return round(float(((c * (1 - s) - s * (1 - s_next)) ** 2 / (2 * var)).max()), 2)


def main() -> None:
    for name, K, kw in grids():
        row = {"grid": name, "steps": K}
        for eta in (1.0, 0.5):
            schedule = FlowMatchSchedule(kw["scheduler"], K, eta, mu=kw.get("mu"), sigmas=kw.get("sigmas"))
            before, after = old_rule(schedule), schedule.random_steps()
            if eta == 1.0:
                row["deterministic_before"] = [k for k in range(K) if k not in before]
                row["deterministic_after"] = [k for k in range(K) if k not in after]
                row["control_ends_before"] = round(float(schedule.next_levels[before[-1]]), 4) if before else None
                row["control_ends_after"] = round(schedule.control_end_level, 4) if after else None
            row[f"max_kl_factor_eta{eta:g}_before"] = max_factor(schedule, before)
            row[f"max_kl_factor_eta{eta:g}_after"] = max_factor(schedule, after)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
