"""What a run will cost before it starts: samples pushed through the denoiser, per stage.

Counted in *sample evaluations*: one sample through the network once (a batch of ``B`` samples through one step
is ``B``; classifier-free guidance doubles it). Stage 1 runs ``value_num_rollouts`` pretrained chains of ``K``
steps; the per-step values of ``drift_objective="value_guided"`` run as many again; stage 2 uses only the small
initial-noise network (no denoiser call). One drift iteration is a rollout of ``K`` steps plus, for every step
in the backward window, a fine-tuned and a pretrained forward and one backward through both (counted as two
backward sample evaluations).
"""

from __future__ import annotations


def network_evaluations(config, guidance_factor: int = 1, num_processes: int = 1) -> dict:
    """Sample evaluations per stage for ``config`` (an ``ElegantConfig``), summed over all processes.

    ``guidance_factor``: 2 under classifier-free guidance (the UNet sees every sample twice), else 1.
    """
    K = config.num_inference_steps
    window = K if config.truncate_backprop_steps is None else min(K, config.truncate_backprop_steps)
    g = int(guidance_factor)
    stage1 = config.value_num_rollouts * K * g if config.learn_initial_noise else 0
    step_values = config.value_num_rollouts * K * g if config.drift_objective == "value_guided" else 0
    per_iteration = config.batch_size * getattr(config, "gradient_accumulation_steps", 1) * num_processes * g
    drift_forward = config.train_steps * per_iteration * (K + 2 * window)
    drift_backward = config.train_steps * per_iteration * 2 * window
    before = stage1 + step_values
    total = before + drift_forward + drift_backward
    return {"stage1_forward": stage1, "step_values_forward": step_values, "stage2_forward": 0,
            "drift_forward": drift_forward, "drift_backward": drift_backward, "total": total,
            "stages_before_drift_fraction": before / total if total else 0.0}


def describe(costs: dict) -> str:
    """One log line for :func:`network_evaluations`."""
    return (f"network sample evaluations: stage 1 {costs['stage1_forward']:,}, step values "
            f"{costs['step_values_forward']:,}, stage 2 0 (initial-noise network only), drift "
            f"{costs['drift_forward']:,} forward + {costs['drift_backward']:,} backward; the stages before the drift "
            f"are {100 * costs['stages_before_drift_fraction']:.1f}% of the run")
