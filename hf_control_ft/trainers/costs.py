"""What a run will cost before it starts: samples pushed through the denoiser, per stage.

Counted in *sample evaluations*: one sample through the network once (a batch of ``B`` samples through one step
is ``B``; classifier-free guidance doubles it). Stage 1 runs ``value_num_rollouts`` pretrained chains of ``K``
steps; the per-step values of ``drift_objective="value_guided"`` run as many again; stage 2 uses only the small
initial-noise network (no denoiser call). One drift iteration is a rollout of ``K`` steps plus, for every step
in the backward window, a fine-tuned and a pretrained forward and one backward through both (counted as two
backward sample evaluations); the regression objectives need fewer (:func:`iteration_passes`). :class:`WallTime` turns the counts into hours from the throughput measured in the
first rollouts and drift iterations, refined as the run goes.
"""

from __future__ import annotations

import logging
import time


logger = logging.getLogger(__name__)


def iteration_passes(config, stochastic_steps: int | None = None) -> dict:
    """Denoiser passes of one drift iteration per sample, by kind (before classifier-free guidance's doubling).

    ``rollout``: the chain's ``K`` no-grad passes (the training precision); ``kl_forward``: passes that feed the KL
    or the regression (fine-tuned and pretrained, in ``kl_precision``); ``backward``: backward passes through the
    network (an input VJP of the pretrained network or the LoRA gradient of the fine-tuned one; with
    ``gradient_checkpointing`` each also recomputes its forward). Per objective, with ``W`` the backprop window,
    ``n`` the stochastic steps (``stochastic_steps``, default ``K``) and ``m = round(train_timestep_fraction * n)``:

    * ``pathwise``: ``2 W`` KL passes, ``2 W`` backward (both networks at every step of the window);
    * ``adjoint_matching``: the lean adjoint's pretrained pass and VJP at every step, the fine-tuned pass and its
      backward at the ``m`` trained steps: ``K + m`` and ``K + m``;
    * ``value_guided``: a pretrained and a fine-tuned pass at the ``m`` trained steps, one backward: ``2 m`` and
      ``m`` (the fitted values replace the adjoint).
    """
    K = config.num_inference_steps
    n = K if stochastic_steps is None else int(stochastic_steps)
    m = max(1, round(getattr(config, "train_timestep_fraction", 1.0) * n))
    objective = config.drift_objective
    if objective == "adjoint_matching":
        kl_forward, backward = K + m, K + m
    elif objective == "value_guided":
        kl_forward, backward = 2 * m, m
    else:  # "pathwise" (and "auto" before the trainer resolves it: the costliest)
        window = K if config.truncate_backprop_steps is None else min(K, config.truncate_backprop_steps)
        kl_forward, backward = 2 * window, 2 * window
    return {"rollout": K, "kl_forward": kl_forward, "backward": backward,
            "recompute": backward if getattr(config, "gradient_checkpointing", False) else 0}


def network_evaluations(config, guidance_factor: int = 1, num_processes: int = 1,
                        stochastic_steps: int | None = None) -> dict:
    """Sample evaluations per stage for ``config`` (an ``ElegantConfig``), summed over all processes.

    ``guidance_factor``: 2 under classifier-free guidance (the UNet sees every sample twice), else 1.
    ``stochastic_steps``: the sampler's random steps (default ``num_inference_steps``), for the regression
    objectives' counts (:func:`iteration_passes`).
    """
    K = config.num_inference_steps
    g = int(guidance_factor)
    stage1 = config.value_num_rollouts * K * g if config.learn_initial_noise else 0
    step_values = config.value_num_rollouts * K * g if config.drift_objective == "value_guided" else 0
    per_iteration = config.batch_size * getattr(config, "gradient_accumulation_steps", 1) * num_processes * g
    passes = iteration_passes(config, stochastic_steps)
    drift_forward = config.train_steps * per_iteration * (passes["rollout"] + passes["kl_forward"])
    drift_backward = config.train_steps * per_iteration * passes["backward"]
    before = stage1 + step_values
    total = before + drift_forward + drift_backward
    return {"stage1_forward": stage1, "step_values_forward": step_values, "stage2_forward": 0,
            "drift_forward": drift_forward, "drift_backward": drift_backward, "total": total,
            "stages_before_drift_fraction": before / total if total else 0.0}


#: sustained rates the modelled hours assume, TFLOP/s: bf16 work at 40 % of an H100 / H200's dense peak (an assumption),
#: fp32-arithmetic KL passes at the rate the one GPU measurement implies (``benchmarks/cost_model.py`` calibrates it)
BF16_TFLOPS, FP32_TFLOPS = 400.0, 9.7


def modelled_seconds(config, tflop_per_evaluation: float, fp32_kl_passes: bool, stochastic_steps: int | None = None,
                     bf16_tflops: float = BF16_TFLOPS, fp32_tflops: float = FP32_TFLOPS) -> dict:
    """Seconds on one GPU from FLOPs, before anything is measured: ``{"iteration_s", "run_s", "sampling_s"}`` -- one
    drift iteration (``batch_size x gradient_accumulation_steps`` samples), the whole run on one process (stages 1-2
    included), and one plain bf16 sample. ``tflop_per_evaluation``: one sample's denoiser evaluation with guidance;
    a backward pass costs one forward's FLOPs (activation gradients: the frozen weights get none), gradient
    checkpointing one more; ``fp32_kl_passes``: the KL passes run in fp32 arithmetic (``kl_precision`` ``"fp32"`` /
    ``"upcast"``), else in bf16."""
    passes = iteration_passes(config, stochastic_steps)
    samples = config.batch_size * getattr(config, "gradient_accumulation_steps", 1)
    exact = passes["kl_forward"] + passes["backward"] + passes["recompute"]
    rollout_tflop, kl_tflop = passes["rollout"] * samples * tflop_per_evaluation, exact * samples * tflop_per_evaluation
    iteration = rollout_tflop / bf16_tflops + kl_tflop / (fp32_tflops if fp32_kl_passes else bf16_tflops)
    K = config.num_inference_steps
    rollouts = config.value_num_rollouts * K * tflop_per_evaluation
    before = (rollouts if config.learn_initial_noise else 0.0) + (
        rollouts if config.drift_objective == "value_guided" else 0.0)
    return {"iteration_s": iteration, "run_s": config.train_steps * iteration + before / bf16_tflops,
            "sampling_s": K * tflop_per_evaluation / bf16_tflops}


def describe_model_estimate(seconds: dict, num_processes: int, samples_per_iteration: int) -> str:
    """One log line for :func:`modelled_seconds`."""
    ratio = seconds["iteration_s"] / (samples_per_iteration * seconds["sampling_s"])
    return (f"cost model (benchmarks/cost_model.py, the family's published size): about "
            f"{seconds['run_s'] * num_processes / 3600:.1f} GPU-hours on H100 / H200-class GPUs, an iteration "
            f"{ratio:.0f}x plain sampling of its samples (assumed {BF16_TFLOPS:.0f} TFLOP/s in bf16, {FP32_TFLOPS} "
            f"for fp32-arithmetic KL passes); the measured estimate follows the first steps")


def describe(costs: dict) -> str:
    """One log line for :func:`network_evaluations`."""
    return (f"network sample evaluations: stage 1 {costs['stage1_forward']:,}, step values "
            f"{costs['step_values_forward']:,}, stage 2 0 (initial-noise network only), drift "
            f"{costs['drift_forward']:,} forward + {costs['drift_backward']:,} backward; the stages before the drift "
            f"are {100 * costs['stages_before_drift_fraction']:.1f}% of the run")


class WallTime:
    """The run's cost in hours, from a throughput measured as it goes.

    The sample evaluations of :func:`network_evaluations` are all of similar cost (a backward one is counted as
    one evaluation, as the counts do). :meth:`add` records the seconds and evaluations of work just done (the
    stage-1 rollouts, then every drift iteration); :meth:`estimate` turns the seconds per evaluation measured
    so far into the wall time of what is left: ``{"stages_1_2_s", "drift_s", "total_s"}`` (``None`` before any
    measurement). Drift iterations, once measured, are timed as such (they include optimiser steps and the
    reward's backward pass).
    """

    def __init__(self, costs: dict, train_steps: int):
        self.costs, self.train_steps = costs, int(train_steps)
        self.seconds = self.evaluations = 0.0
        self.done_before_drift = 0
        self.drift_seconds, self.drift_iterations = 0.0, 0
        self._t = time.perf_counter()

    def restart(self) -> None:
        """Starts timing the next piece of work (call before it)."""
        self._t = time.perf_counter()

    def add(self, evaluations: int, drift_iterations: int = 0) -> None:
        now = time.perf_counter()
        if drift_iterations:
            self.drift_seconds += now - self._t
            self.drift_iterations += drift_iterations
        else:
            self.seconds += now - self._t
            self.evaluations += evaluations
            self.done_before_drift += evaluations
        self._t = now

    def estimate(self, drift_steps_done: int = 0) -> dict | None:
        if not self.evaluations and not self.drift_iterations:
            return None
        per_iteration_evals = (self.costs["drift_forward"] + self.costs["drift_backward"]) / max(1, self.train_steps)
        per_eval = self.seconds / self.evaluations if self.evaluations else None
        if self.drift_iterations:
            per_iteration = self.drift_seconds / self.drift_iterations
        else:
            per_iteration = per_iteration_evals * per_eval
        if per_eval is None:
            per_eval = per_iteration / max(1.0, per_iteration_evals)
        before = self.costs["stage1_forward"] + self.costs["step_values_forward"]
        stages = max(0.0, before - self.done_before_drift) * per_eval
        drift = max(0, self.train_steps - drift_steps_done) * per_iteration
        return {"stages_1_2_s": stages, "drift_s": drift, "total_s": stages + drift}


def hours(seconds: float) -> str:
    """``"2 h 05 min"`` / ``"7 min"`` / ``"40 s"``."""
    seconds = float(seconds)
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def describe_time(estimate: dict, measured: str) -> str:
    """One log line for :meth:`WallTime.estimate`."""
    return (f"estimated wall time left: stages 1-2 {hours(estimate['stages_1_2_s'])}, drift "
            f"{hours(estimate['drift_s'])}, total {hours(estimate['total_s'])} (from {measured})")


class WallTimeLog:
    """Mixin of the trainers: ``self._clock`` (a :class:`WallTime`, set by ``train()``) fed with the work done."""

    def _restart_clock(self) -> None:
        if getattr(self, "_clock", None) is not None:
            self._clock.restart()

    def _timed(self, evaluations: int = 0, drift: bool = False) -> float | None:
        """Feeds the wall-time estimate (:class:`~hf_control_ft.trainers.costs.WallTime`) with the work just
        done; logs it after the first rollouts and the first drift iteration. Returns the seconds left."""
        clock = getattr(self, "_clock", None)
        if clock is None:
            return None
        first = not (clock.drift_iterations if drift else clock.evaluations)
        clock.add(evaluations, drift_iterations=int(drift))
        estimate = clock.estimate(self.global_step)
        if first and self.is_main_process:
            logger.info(describe_time(estimate, "the first drift iteration" if drift else "the first rollouts"))
        return estimate["total_s"]
