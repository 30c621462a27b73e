"""Which drift objective a run uses when the config says ``drift_objective="auto"`` (the default).

All drift objectives share the optimum (``docs/algorithms.md`` §2, §7); they differ in variance, bias and
memory. On the exact Gaussian-mixture benchmarks (2-D and 3-D samples) the value-guided regression is the one
that reaches the tilted law; on the 64-dimensional digits task its per-step values, fitted on a few hundred
rollouts, bias the drift: it ends at a worse objective ``E[r] - alpha KL`` than the exact pathwise gradient
(README, "Choosing the drift objective"). So ``"auto"`` picks ``"value_guided"`` where the values are fitted in
a low-dimensional state (at most :data:`STEP_VALUE_MAX_DIM` dimensions per sample) and their stored states fit
in memory, and the exact ``"pathwise"`` gradient otherwise. The trainer logs the choice and the reason in one
line; an explicit choice always wins.
"""

from __future__ import annotations

#: stored pretrained states above which ``drift_objective="auto"`` does not pick ``"value_guided"`` (bytes)
STEP_VALUE_MEMORY_BUDGET = 2 * 2**30
#: sample dimensions above which ``"auto"`` does not pick ``"value_guided"`` (its per-step value fit degrades)
STEP_VALUE_MAX_DIM = 16


def choose_drift_objective(config, process) -> tuple[str, str]:
    """``(objective, reason)``: ``config.drift_objective`` unless it is ``"auto"``; then ``"value_guided"``
    (per-step values: the low-variance target that reaches the tilted law on the exact benchmarks) where the
    process offers per-step values, a sample has at most :data:`STEP_VALUE_MAX_DIM` dimensions and the
    ``value_num_rollouts x num_inference_steps`` stored states fit in :data:`STEP_VALUE_MEMORY_BUDGET`, and
    ``"pathwise"`` (the exact gradient) otherwise (module docstring)."""
    if config.drift_objective != "auto":
        return config.drift_objective, "set in the config"
    if config.truncate_backprop_steps is not None:
        return "pathwise", "truncate_backprop_steps applies to the pathwise gradient"
    if not process.supports_step_values:
        return "pathwise", (f"the {process.family} process does not offer per-step values (they would store "
                            "value_num_rollouts x num_inference_steps latents)")
    numel = 1
    for d in process.sample_shape:
        numel *= int(d)
    if numel > STEP_VALUE_MAX_DIM:
        return "pathwise", (f"samples have {numel} dimensions: per-step values fitted on value_num_rollouts rollouts "
                            f"bias the drift above {STEP_VALUE_MAX_DIM} (measured on the digits task), the exact "
                            "pathwise gradient does not")
    stored = config.value_num_rollouts * config.num_inference_steps * numel * 4
    if stored > STEP_VALUE_MEMORY_BUDGET:
        return "pathwise", (f"per-step values would store {stored / 2**30:.1f} GiB of states (value_num_rollouts x "
                            f"num_inference_steps x sample size), above {STEP_VALUE_MEMORY_BUDGET / 2**30:.0f} GiB")
    return "value_guided", ("per-step values fit in memory; their regression target has the lowest variance and "
                            "reaches the tilted target on the exact benchmarks (README)")


__all__ = ["choose_drift_objective", "STEP_VALUE_MEMORY_BUDGET", "STEP_VALUE_MAX_DIM"]
