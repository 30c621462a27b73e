"""ELEGANT: entropy-regularised reward fine-tuning of a diffusion model (``docs/algorithms.md`` §2-4).

    maximise  J = E[r(x_0)] - alpha * ( KL(nu_phi || N(0, I)) + sum_k E[ KL_k ] )

Stage 1 fits the soft value at the start of sampling, ``v_T``, by Feynman--Kac regression on pretrained
rollouts; stage 2 trains the initial-noise model ``nu_phi`` to ``nu* ∝ N(0, I) exp(v_T / alpha)``; stage 3 trains
the LoRA drift on ``r(x_0) - alpha * sum_k KL_k`` with ``x_T ~ nu_phi``: by backpropagation through the
sampler (``drift_objective="pathwise"``), or by regressing the control onto adjoint (``"adjoint_matching"``)
or fitted-value (``"value_guided"``) targets with the same optimum (:mod:`hf_control_ft.core.adjoint_matching`).
The optimum samples the tilted law ``p_pre(x) exp(r(x) / alpha) / Z``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from accelerate import Accelerator

from ..core.control import lora_parameters
from ..models.initial_noise import InitialNoiseModel
from ..models.step_values import StepValueFunction, select_states
from ..models.value_function import ValueFunction
from ..processes import ControlledProcess, process_from_pipeline
from ..serialization import checkpoints as checkpointing
from ..serialization.saved import save_control
from .base import BaseTrainer
from .costs import WallTime, WallTimeLog, describe, network_evaluations
from .distributed import lock_on_main, run_on_main
from .sharding import shard_if_requested
from .elegant_checkpoints import ElegantCheckpointing
from .elegant_config import ElegantConfig
from .objectives import choose_drift_objective, step_value_states_per_rollout

logger = logging.getLogger(__name__)


class ElegantTrainer(ElegantCheckpointing, WallTimeLog, BaseTrainer):
    """Fine-tunes a controlled process toward ``reward_fn`` with ELEGANT.

    Args:
        config: :class:`ElegantConfig`.
        model: denoiser called as ``model(sample, timestep, **model_kwargs)``; a LoRA adapter named
            ``"control"`` is added unless the model already has one. Its base weights are frozen.
        scheduler: diffusers ``DDPMScheduler`` or ``DDIMScheduler``.
        reward_fn: ``(B, *sample_shape) -> (B,)``, differentiable (for a pipeline: ``fn(images, prompts)``).
        sample_shape: shape of one sample (e.g. ``(2,)``, ``(1, 8, 8)``, ``(4, 64, 64)``).
        accelerator: an ``accelerate.Accelerator``; one is created from the config if omitted.
        model_kwargs: extra keyword arguments for every denoiser call.
        process: a ready :class:`~hf_control_ft.processes.ControlledProcess` instead of
            ``model`` / ``scheduler`` / ``sample_shape`` (:meth:`from_pipeline` builds one from a pipeline).
    """

    def __init__(self, config: ElegantConfig, model: torch.nn.Module | None = None, scheduler=None, reward_fn=None,
                 sample_shape=None, accelerator: Accelerator | None = None, model_kwargs: dict | None = None,
                 process: ControlledProcess | None = None):
        if not isinstance(config, ElegantConfig):
            raise TypeError(f"config must be an ElegantConfig, got {type(config).__name__}")
        super().__init__(config, accelerator)
        torch.manual_seed(config.seed)  # identical adapter / network init on every process
        if process is None:
            if model is None or scheduler is None or sample_shape is None:
                raise ValueError("pass model, scheduler and sample_shape, or a process")
            process = ControlledProcess(model.to(self.device), scheduler, sample_shape, config, model_kwargs)
        objective, reason = choose_drift_objective(config, process)
        if objective != config.drift_objective:
            logger.info("drift_objective='auto' -> %r: %s", objective, reason)
            config.drift_objective = objective  # the resolved choice is what checkpoints and saves record
        self.drift_objective_reason = reason  # also in train()'s summary
        if config.drift_objective == "value_guided" and not process.supports_step_values:
            raise ValueError(f"ElegantConfig.drift_objective: the {process.family} process does not offer per-step "
                             "values ('value_guided'); use 'pathwise' or 'adjoint_matching'")
        self.sharded = shard_if_requested(config, self.accelerator, process, self.device)
        self.process = process.to(self.device)
        self.sampler = process.make_sampler()
        self.set_reward(reward_fn)
        if config.learn_initial_noise:
            self.initial_noise = InitialNoiseModel(self.sample_shape, num_steps=config.noise_num_steps,
                                                   hidden=config.aux_hidden,
                                                   cond_dim=self.condition_dim).to(self.device)
        self.value_function = None
        self.step_values = None  # drift_objective="value_guided": V_k at every step
        self.global_step = 0
        self.initial_noise_trained = False
        self._optimizer_state = None  # restored by load_checkpoint, applied when the drift optimiser exists
        self._callback = None  # train(callback=...)
        self._step_value_rng = None  # generator state the per-step values are drawn with (checkpointed)
        #: the optimum ``J* = alpha log E_pre[exp(r / alpha)]`` where the task knows it (exact targets, digits by
        #: rejection): logged as ``train/objective_gap = J* - J``, the path KL to the tilted law times alpha
        self.optimum: float | None = None

    # ------------------------------------------------------------------ stage 1
    def _pretrained_rollouts(self, desc: str, generator: torch.Generator | None = None):
        """Yields ``(trajectory, reward, condition features or None)`` for batches of the pretrained chain from
        ``N(0, I)``: this process's share of ``value_num_rollouts`` (the Feynman--Kac data of stage 1 and of the
        step values), drawn with ``generator`` (default: the trainer's)."""
        cfg = self.config
        gen = generator if generator is not None else self.generator
        n_local = math.ceil(cfg.value_num_rollouts / self.accelerator.num_processes)
        batch = cfg.rollout_batch_size or cfg.batch_size
        for start in self._progress(range(0, n_local, batch), desc):
            b = min(batch, n_local - start)
            self.process.prepare_batch(b, gen)
            x_T = torch.randn((b, *self.sample_shape), generator=gen).to(self.device)
            traj = self.sampler.rollout(x_T, gen, controlled=False)
            with torch.no_grad():
                r = self._reward(traj.samples, require_grad=False).float()
            self._timed(b * cfg.num_inference_steps * (2 if getattr(self.model, "do_guidance", False) else 1))
            yield traj, r, self.step_condition()
            self._restart_clock()

    def _gather_conditions(self, conds: list, width: int):
        """The rollouts' condition features gathered over processes, or ``None`` for a network that takes no
        condition (``width`` 0)."""
        return None if not width else self.accelerator.gather(torch.cat(conds))

    def fit_value_function(self) -> dict:
        """Stage 1: Feynman--Kac regression of ``v_T`` on pretrained rollouts (gathered over processes)."""
        cfg = self.config
        xs, rs, cs = [], [], []
        for traj, r, c in self._pretrained_rollouts("stage 1: pretrained rollouts"):
            xs.append(traj.states[0])
            rs.append(r)
            cs.append(c)
        x_T, r = torch.cat(xs), torch.cat(rs)
        x_T, r = self.accelerator.gather(x_T), self.accelerator.gather(r)
        c = self._gather_conditions(cs, self.condition_dim)
        torch.manual_seed(cfg.seed + 1)  # same value network on every process
        self.value_function = ValueFunction(self.sample_shape, cfg.alpha, hidden=cfg.aux_hidden,
                                            cond_dim=self.condition_dim).to(self.device)
        fit_gen = torch.Generator().manual_seed(cfg.seed + 2)
        loss = self.value_function.fit(x_T, r, steps=cfg.value_train_steps, lr=cfg.value_learning_rate,
                                       generator=fit_gen, progress=self.is_main_process, conditions=c)
        self.value_function.requires_grad_(False)
        metrics = {"value/loss": loss, "value/pretrained_reward_mean": float(r.mean()),
                   "value/shift": float(self.value_function.shift)}
        metrics.update({f"value/{k}": float(v) for k, v in self.value_function.validation.items()})
        self._log(metrics, step=self.global_step)
        return metrics

    # ------------------------------------------------------------------ stage 2
    def train_initial_noise(self) -> dict:
        """Stage 2: maximise ``E[v_T(x_T)] - alpha * KL(nu_phi)`` over the initial-noise model."""
        cfg = self.config
        if self.initial_noise is None:
            raise RuntimeError("learn_initial_noise=False: there is no initial-noise model to train")
        if self.value_function is None:
            self.fit_value_function()
        metrics = self.fit_initial_noise(self.value_function, cfg.noise_train_steps, self.generator,
                                         desc="stage 2: initial noise", log_step_offset=1)
        self.initial_noise_trained = True
        return metrics

    # ------------------------------------------------------------------ stage 3
    def fit_step_values(self, generator: torch.Generator | None = None) -> dict:
        """Feynman--Kac regression of ``V_k`` at every step (:mod:`hf_control_ft.models.step_values`) on
        ``value_num_rollouts`` pretrained rollouts from ``N(0, I)``, keeping ``m`` states of each
        (:func:`~hf_control_ft.trainers.objectives.step_value_states_per_rollout`; the steps are drawn from a stream
        of their own). ``generator``: the rollouts' stream (default: the trainer's; :meth:`train` passes the state
        it had after stages 1-2, kept by checkpoints, so a resumed run refits the uninterrupted run's values)."""
        cfg = self.config
        K = len(self.schedule)
        m = step_value_states_per_rollout(cfg, math.prod(self.sample_shape)) or 1
        pick = torch.Generator().manual_seed(cfg.seed + 5) if m < K else None
        states, steps, rs, cs = [], [], [], []
        for traj, r, c in self._pretrained_rollouts("step values: pretrained rollouts", generator):
            x, idx = select_states(traj.states[:K], m, pick)
            states.append(x)
            steps.append(idx.to(self.device))
            rs.append(r)
            cs.append(c)
        states, steps = self.accelerator.gather(torch.cat(states)), self.accelerator.gather(torch.cat(steps))
        r, c = self.accelerator.gather(torch.cat(rs)), self._gather_conditions(cs, self.process.condition_dim)
        times = self.schedule.timesteps.float() / self.schedule.scheduler.config.num_train_timesteps
        torch.manual_seed(cfg.seed + 3)  # same network on every process
        self.step_values = StepValueFunction(self.sample_shape, cfg.alpha, times, hidden=cfg.aux_hidden,
                                             cond_dim=self.process.condition_dim).to(self.device)
        loss = self.step_values.fit(states, r, steps=cfg.step_value_train_steps, lr=cfg.value_learning_rate,
                                    generator=torch.Generator().manual_seed(cfg.seed + 4),
                                    progress=self.is_main_process, conditions=c, step_index=steps)
        metrics = {"step_values/loss": loss, "step_values/states_per_rollout": m,
                   "step_values/stored_mib": states.numel() * states.element_size() / 2**20}
        self._log(metrics, step=self.drift_log_offset + self.global_step)
        return metrics

    def drift_step(self, optimizer, params) -> dict:
        """One stage-3 iteration; returns its metrics.

        ``drift_objective="pathwise"``: exact gradient of ``mean(-r + alpha * (KL_drift + KL_init))``
        (``train/loss`` is its value). ``"adjoint_matching"``: the regression of
        :func:`~hf_control_ft.core.adjoint_matching.adjoint_matching_backward` (``train/loss`` is the regression
        loss); ``"value_guided"``: the same regression with ``grad V_{k+1}`` of :meth:`fit_step_values` as target;
        reward, exact KL and objective are logged the same way for every objective.
        """
        cfg = self.config
        value_gradient = None
        if cfg.drift_objective == "value_guided":
            if self.step_values is None:
                self.fit_step_values()
            value_gradient = self.step_values.gradient
        self.reward_terms()  # a mix's terms: only this iteration's calls are logged below
        out = self.drift_iteration(optimizer, params, value_gradient=value_gradient)
        r, kl, kl_init = out["reward"], out["kl"], out["kl_init"]  # exact path KL of the rollout's chain
        training_kl = None
        if out.get("kl_exact") is not None:  # half-precision KL passes: J and the KL from the exact re-evaluation
            n = out["kl_exact"].numel()
            training_kl = kl.mean().item()
            r, kl, kl_init = r[-n:], out["kl_exact"], kl_init[-n:]
        per_sample = r - cfg.alpha * (kl + kl_init)  # J = E[r] - alpha KL, estimated per sample
        objective = per_sample.mean().item()
        objective_se = per_sample.std().item() / math.sqrt(per_sample.numel()) if per_sample.numel() > 1 else math.nan
        kl_total = (kl + kl_init).mean().item()  # the whole path's: the chain's steps and the start law's
        metrics = {"train/reward": r.mean().item(), "train/kl": kl.mean().item(),
                   "train/kl_init": kl_init.mean().item(), "train/kl_total": kl_total,
                   "train/objective": objective, "train/objective_se": objective_se, "train/loss": -objective,
                   "train/grad_norm": out["grad_norm"], "train/skipped_steps": self.skipped_steps,
                   **self.reward_terms()}
        if training_kl is not None:
            metrics["train/kl_se"] = kl.std().item() / math.sqrt(kl.numel()) if kl.numel() > 1 else math.nan
            metrics["train/kl_in_training_precision"] = training_kl
        if out["regression_loss"] is not None:
            metrics["train/loss"] = metrics["train/adjoint_matching_loss"] = out["regression_loss"]
        if self.optimum is not None:  # J* = alpha log E_pre[exp(r / alpha)], where the task knows it
            metrics["train/objective_gap"] = self.optimum - objective
        return metrics

    def train_drift(self) -> dict:
        """Stage 3: LoRA drift training for ``config.train_steps`` iterations."""
        cfg = self.config
        params = lora_parameters(self.model)
        if not params:
            raise RuntimeError("no trainable LoRA parameters found on the model")
        if cfg.drift_objective == "value_guided" and self.step_values is None:
            gen = None
            if self._step_value_rng is not None:
                gen = torch.Generator()
                gen.set_state(self._step_value_rng)
            self.fit_step_values(gen)
        opt, lr_schedule = self.make_optimizer(params)
        if self._optimizer_state is not None:  # resuming: restore moments and the schedule position
            tensors, meta = self._optimizer_state
            checkpointing.load_optimizer_state(opt, tensors, meta["optimizer"])
            lr_schedule.load_state_dict(meta["lr_schedule"])
            self._optimizer_state = None
        metrics = {}
        bar = self._progress(range(self.global_step, cfg.train_steps), "stage 3: drift")
        self._restart_clock()
        for _ in bar:
            # the randomness of step n depends on (seed, rank, n) only, so a resumed run repeats it exactly
            self.generator.manual_seed(self._step_seed(self.global_step))
            # a logging step: where the KL passes are half precision, the logged KL is evaluated exactly
            self._exact_kl_due = (self.global_step + 1) % cfg.log_every == 0 or self.global_step + 1 == cfg.train_steps
            metrics = self.drift_step(opt, params)
            metrics["train/lr"] = lr_schedule.get_last_lr()[0]
            lr_schedule.step()
            self.global_step += 1
            remaining = self._timed(drift=True)
            if remaining is not None:
                metrics["time/remaining_s"] = remaining
            if self.global_step % cfg.log_every == 0 or self.global_step == cfg.train_steps:
                metrics = {k: float(self.accelerator.reduce(torch.tensor(float(v), device=self.device), "mean"))
                           for k, v in metrics.items()}
                self._log(metrics, step=self.drift_log_offset + self.global_step)
                if self.is_main_process:
                    bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", kl=f"{metrics['train/kl']:.3f}")
            if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                self.save_checkpoint(opt, lr_schedule)
            if self._callback is not None:
                self._callback(self, self.global_step)
        if self.ema is not None:  # --use_ema: the average is the trained adapter from here on
            self.ema.copy_to_params()
            self.ema = None
        return metrics

    def train(self, resume_from_checkpoint: str | None = None, callback=None) -> dict:
        """Runs stages 1-3 (1-2 only with ``learn_initial_noise``); returns final metrics and timings.

        ``resume_from_checkpoint``: ``"latest"`` (newest intact checkpoint in ``config.output_dir``, or a fresh
        start when there is none), ``"checkpoint-N"`` or a checkpoint path. Stages already finished there are not
        repeated, and the drift stage continues at the checkpoint's step with the same randomness an
        uninterrupted run would use. The run holds ``<output_dir>/.lock``: a second run on the same directory
        fails at once.

        ``callback(trainer, step)``: called on every process after each drift step (and its checkpoint), with
        the trackers still open (e.g. validation images every N steps: ``trainer.log_step(step)`` is the tracker
        step of drift step ``step``).
        """
        cfg = self.config
        self._callback = callback
        # the lock and the claim on the output directory are the main process's; their errors (a second run, an
        # old run's checkpoints) are raised on every process, so none waits in a collective for a stopped one
        lock = lock_on_main(self.accelerator, cfg.output_dir)
        with lock if lock is not None else contextlib.nullcontext():
            checkpoint = checkpointing.resolve_checkpoint(cfg.output_dir, resume_from_checkpoint)
            if checkpoint is not None:
                self.load_checkpoint(checkpoint)
            elif cfg.output_dir:
                run_on_main(self.accelerator, checkpointing.claim_output_dir, cfg.output_dir,
                            cfg.overwrite_output_dir, resuming=resume_from_checkpoint is not None)
            self._start_trackers()
            costs = self.network_evaluations()
            if self.is_main_process:
                logger.info(describe(costs))
            P = self.accelerator.num_processes  # this process's share, timed on this process
            self._clock = WallTime({k: v / P for k, v in costs.items()}, cfg.train_steps)
            self._log({f"cost/{k}": v for k, v in costs.items()}, step=0)  # what each stage will cost
            summary = {"resumed_from": checkpoint, "network_evaluations": costs,
                       "drift_objective": cfg.drift_objective, "drift_objective_reason": self.drift_objective_reason}
            t0 = time.perf_counter()
            ran_stages = self.initial_noise is not None and not self.initial_noise_trained
            if ran_stages:
                summary.update(self.fit_value_function())
                summary.update(self.train_initial_noise())
            if self._step_value_rng is None:  # the per-step values' stream, kept in every checkpoint
                self._step_value_rng = self.generator.get_state()
            if ran_stages and cfg.checkpointing_steps:
                self.save_checkpoint()  # checkpoint-0: stages 1-2 are never repeated after a crash
            t1 = time.perf_counter()
            summary.update(self.train_drift())
            t2 = time.perf_counter()
            summary.update({"time/stages_1_2_s": t1 - t0, "time/drift_s": t2 - t1})
            self.accelerator.wait_for_everyone()
            self._end_trackers()
        return summary

    def network_evaluations(self) -> dict:
        """Sample evaluations of the denoiser each stage of this run will cost (:mod:`.costs`)."""
        guidance = 2 if getattr(self.model, "do_guidance", False) else 1
        stochastic = len(self.sampler.schedule.random_steps())
        return network_evaluations(self.config, guidance, self.accelerator.num_processes, stochastic)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str, metrics: dict | None = None, sample_grid=None,
                        base_model: str | None = None, repo_id: str | None = None,
                        card_info: dict | None = None) -> None:
        """Writes the adapter (``pytorch_lora_weights.safetensors``, diffusers format with metadata), the
        initial-noise model, the config, the process's options and a model card ``README.md``
        (:mod:`hf_control_ft.serialization.saved`).

        Args:
            metrics: ``{name: value}`` for the card's metrics table.
            sample_grid: PIL image or path of a PNG, copied to ``sample_grid.png`` and shown in the card.
            base_model: Hub id / path of the base model, for the card and the loading snippets.
            repo_id: Hub repo the card's loading snippets refer to.
            card_info: extra card fields, e.g. ``{"dataset": "user/prompts"}``.

        Only the main process writes.
        """
        if not self.is_main_process:
            return
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():  # --use_ema: the average
            save_control(save_directory, self.process, self.config, self.initial_noise, reward=self.reward_name,
                         metrics=metrics, sample_grid=sample_grid, base_model=base_model, repo_id=repo_id,
                         card_info=card_info)

    @classmethod
    def from_pretrained(cls, directory: str, model: torch.nn.Module | None = None, scheduler=None, reward_fn=None,
                        accelerator: Accelerator | None = None, pipeline=None, prompts=None,
                        **config_overrides) -> "ElegantTrainer":
        """Rebuilds a trainer from :meth:`save_pretrained` output (a directory or a Hub repo id), e.g. to
        continue training: on a fresh copy of the base ``model`` + ``scheduler``, or, for a save of a pipeline
        run (``stable_diffusion.json`` present), on a fresh base ``pipeline`` with its saved options
        (``prompts`` default to the empty prompt).

        The saved config gives the model's settings; the run-local ones (``output_dir``, ``logging_dir``,
        ``report_to``, checkpointing, ...) are the defaults or ``config_overrides``, never the publisher's.
        The adapter is re-created from the LoRA file's metadata (rank, lora_alpha, targets) and its weights
        loaded; the initial-noise model comes from ``initial_noise/``.
        """
        from .elegant_loading import load_saved_trainer

        return load_saved_trainer(cls, directory, model, scheduler, reward_fn, accelerator, pipeline, prompts,
                                  **config_overrides)

    @classmethod
    def from_pipeline(cls, pipeline, reward_fn, config: ElegantConfig, prompts, accelerator=None, **options):
        """ELEGANT on a diffusers pipeline (``StableDiffusionPipeline``: text-conditioned, classifier-free
        guidance), through its controlled process (:func:`hf_control_ft.processes.process_from_pipeline`).

        Args:
            pipeline: the base pipeline; its UNet gets the LoRA control adapter (diffusers ``add_adapter``).
            reward_fn: ``reward_fn(images, prompts) -> (B,)`` on decoded images in ``[0, 1]``.
            config: :class:`ElegantConfig`.
            prompts: a list of prompts, a text file (one per line) or a ``datasets`` dataset.
            **options: fields of :class:`hf_control_ft.processes.StableDiffusionOptions` (``guidance_scale``,
                ``negative_prompt``, ``height``, ``width``, ``mixed_precision``, ``kl_precision``,
                ``base_model``, ``prompt_column``).
        """
        if not isinstance(config, ElegantConfig):
            raise TypeError(f"config must be an ElegantConfig, got {type(config).__name__}")
        process = process_from_pipeline(pipeline, config, prompts, **options)
        return cls(config, reward_fn=reward_fn, accelerator=accelerator, process=process)
