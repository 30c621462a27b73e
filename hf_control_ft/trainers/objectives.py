"""Which drift objective a run uses when the config says ``drift_objective="auto"`` (the default).

All drift objectives share the optimum (``docs/algorithms.md`` §2, §7); they differ in variance, bias and
memory. On the exact Gaussian-mixture benchmarks (2-D and 3-D samples) the value-guided regression is the one
that reaches the tilted law; on the 64-dimensional digits task its per-step values, fitted on a few hundred
rollouts, bias the drift: it ends at a worse objective ``E[r] - alpha KL`` than the exact pathwise gradient
(``docs/measurements.md``, "Choosing the drift objective"). So ``"auto"`` picks ``"value_guided"`` where the
values are fitted in a low-dimensional state (at most :data:`STEP_VALUE_MAX_DIM` dimensions per sample) and their
stored states fit in memory, and the exact ``"pathwise"`` gradient otherwise. The trainer logs the choice and the reason in one
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
    states it stores (:func:`step_value_states_per_rollout`, at least one per rollout) fit in
    :data:`STEP_VALUE_MEMORY_BUDGET`, and ``"pathwise"`` (the exact gradient) otherwise (module docstring)."""
    if config.drift_objective != "auto":
        return config.drift_objective, "set in the config"
    if config.truncate_backprop_steps is not None:
        return "pathwise", "truncate_backprop_steps applies to the pathwise gradient"
    if not process.supports_step_values:
        return "pathwise", f"the {process.family} process does not offer per-step values"
    numel = 1
    for d in process.sample_shape:
        numel *= int(d)
    if numel > STEP_VALUE_MAX_DIM:
        return "pathwise", (f"samples have {numel} dimensions: per-step values fitted on value_num_rollouts rollouts "
                            f"bias the drift above {STEP_VALUE_MAX_DIM} (measured on the digits task), the exact "
                            "pathwise gradient does not")
    m = step_value_states_per_rollout(config, numel)
    if m == 0:
        return "pathwise", (f"per-step values would store {config.value_num_rollouts * numel * 4 / 2**30:.1f} GiB of "
                            f"states even at one state per rollout (value_num_rollouts x sample size), above "
                            f"{STEP_VALUE_MEMORY_BUDGET / 2**30:.0f} GiB")
    return "value_guided", ("per-step values fit in memory; their regression target has the lowest variance and "
                            "reaches the tilted target on the exact benchmarks (docs/measurements.md)")


def step_value_states_per_rollout(config, numel: int) -> int:
    """States of each pretrained rollout the per-step value fit keeps: ``config.step_value_states_per_rollout``
    (at most ``num_inference_steps``) if set; else all steps when ``value_num_rollouts x num_inference_steps``
    fp32 states of ``numel`` values fit in :data:`STEP_VALUE_MEMORY_BUDGET`, else as many as fit (0 when not
    even one per rollout does)."""
    K = config.num_inference_steps
    if config.step_value_states_per_rollout is not None:
        return min(int(config.step_value_states_per_rollout), K)
    per_state = config.value_num_rollouts * numel * 4
    return min(K, STEP_VALUE_MEMORY_BUDGET // per_state)


__all__ = ["choose_drift_objective", "step_value_states_per_rollout", "STEP_VALUE_MEMORY_BUDGET",
           "STEP_VALUE_MAX_DIM"]
