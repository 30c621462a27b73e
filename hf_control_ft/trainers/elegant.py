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

import hashlib
import json
import math
import os
import time

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..serialization import checkpoints as checkpointing
from ..core.adjoint_matching import adjoint_matching_backward
from .elegant_config import ElegantConfig
from ..core.control import (CONTROL_ADAPTER, add_lora_control, load_lora_state_dict, lora_parameters,
                      lora_state_dict, tuner_layers)
from ..models.initial_noise import InitialNoiseModel
from ..serialization.lora_io import load_lora_file
from ..serialization.saved import INITIAL_NOISE_DIR, push_directory, read_saved, save_trainer
from ..rewards.checks import check_reward, reward_name
from ..core.sampler import ControlledSampler
from ..core.scheduling import DiffusionSchedule
from ..models.step_values import StepValueFunction
from ..models.value_function import ValueFunction


class ElegantTrainer:
    """Fine-tunes ``model`` toward ``reward_fn`` with ELEGANT.

    Args:
        config: :class:`ElegantConfig`.
        model: denoiser called as ``model(sample, timestep, **model_kwargs)``; a LoRA adapter named
            ``"control"`` is added unless the model already has one. Its base weights are frozen.
        scheduler: diffusers ``DDPMScheduler`` or ``DDIMScheduler``.
        reward_fn: ``(B, *sample_shape) -> (B,)``, differentiable.
        sample_shape: shape of one sample (e.g. ``(2,)``, ``(1, 8, 8)``, ``(4, 64, 64)``).
        accelerator: an ``accelerate.Accelerator``; one is created from the config if omitted.
        model_kwargs: extra keyword arguments for every denoiser call.
    """

    def __init__(self, config: ElegantConfig, model: torch.nn.Module, scheduler, reward_fn, sample_shape,
                 accelerator: Accelerator | None = None, model_kwargs: dict | None = None):
        if not isinstance(config, ElegantConfig):
            raise TypeError(f"config must be an ElegantConfig, got {type(config).__name__}")
        self.config = config
        log_with = None if config.report_to in (None, "none") else config.report_to
        self.accelerator = accelerator or Accelerator(log_with=log_with,
                                                      project_dir=config.logging_dir or "runs")
        self.device = self.accelerator.device
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.reward_fn = reward_fn
        self.reward_name = reward_name(reward_fn) if reward_fn is not None else None

        torch.manual_seed(config.seed)  # identical adapter / network init on every process
        self.model = model.to(self.device)
        if not tuner_layers(self.model):
            self.lora_config = add_lora_control(self.model, config.lora_rank, config.lora_target_modules,
                                                config.lora_alpha)
        else:
            self.lora_config = None
        self.schedule = DiffusionSchedule(scheduler, config.num_inference_steps, config.eta)
        self.sampler = ControlledSampler(self.model, self.schedule, config.gradient_checkpointing,
                                         config.truncate_backprop_steps, model_kwargs)
        self.initial_noise = None
        if config.learn_initial_noise:
            self.initial_noise = InitialNoiseModel(self.sample_shape, num_steps=config.noise_num_steps,
                                                   hidden=config.aux_hidden).to(self.device)
        self.value_function = None
        self.step_values = None  # drift_objective="value_guided": V_k at every step
        self.global_step = 0
        self.initial_noise_trained = False
        self._optimizer_state = None  # restored by load_checkpoint, applied when the drift optimiser exists
        self.history: list[dict] = []
        self._trackers_started = False
        # per-process stream of training randomness
        rank = self.accelerator.process_index
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + rank + 1)

    # ------------------------------------------------------------------ helpers
    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _progress(self, iterable, desc):
        return tqdm(iterable, desc=desc, disable=not self.is_main_process)

    def _start_trackers(self):
        if not self._trackers_started and self.accelerator.log_with:
            cfg = {k: (str(v) if isinstance(v, (list, type(None))) else v) for k, v in self.config.to_dict().items()}
            self.accelerator.init_trackers(self.config.tracker_project_name, config=cfg)
        self._trackers_started = True

    def _log(self, metrics: dict, step: int):
        self.history.append({"step": step, **metrics})
        self.accelerator.log(metrics, step=step)

    def _reward(self, x: torch.Tensor, require_grad: bool) -> torch.Tensor:
        return check_reward(self.reward_fn(x), x.shape[0], self.reward_name, require_grad=require_grad)

    def _sync_grads(self, params):
        """Averages gradients over processes (the model is not DDP-wrapped: the sampler calls it many times)."""
        if self.accelerator.num_processes > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def _clip(self, params):
        if self.config.max_grad_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))

    def _prepare_batch(self, batch_size: int, generator: torch.Generator | None = None) -> None:
        """Called before every batch of samples (conditional trainers set that batch's prompts here)."""

    def draw_initial_noise(self, num_samples: int, generator: torch.Generator | None = None):
        """``(x_T, kl_init)`` without autograd: from the learned model if any, else ``N(0, I)`` (KL 0)."""
        gen = generator if generator is not None else self.generator
        with torch.no_grad():
            if self.initial_noise is not None:
                x_T, kl = self.initial_noise(num_samples, generator=gen, device=self.device)
            else:
                x_T = torch.randn((num_samples, *self.sample_shape), generator=gen).to(self.device)
                kl = torch.zeros(num_samples, device=self.device)
        return x_T, kl

    # ------------------------------------------------------------------ stage 1
    def _pretrained_rollouts(self, desc: str):
        """Yields ``(trajectory, reward)`` for batches of the pretrained chain from ``N(0, I)``: this process's
        share of ``value_num_rollouts`` (the Feynman--Kac data of stages 1 and of the step values)."""
        cfg = self.config
        n_local = math.ceil(cfg.value_num_rollouts / self.accelerator.num_processes)
        for start in self._progress(range(0, n_local, cfg.batch_size), desc):
            b = min(cfg.batch_size, n_local - start)
            self._prepare_batch(b)
            x_T = torch.randn((b, *self.sample_shape), generator=self.generator).to(self.device)
            traj = self.sampler.rollout(x_T, self.generator, controlled=False)
            with torch.no_grad():
                r = self._reward(traj.samples, require_grad=False).float()
            yield traj, r

    def fit_value_function(self) -> dict:
        """Stage 1: Feynman--Kac regression of ``v_T`` on pretrained rollouts (gathered over processes)."""
        cfg = self.config
        xs, rs = [], []
        for traj, r in self._pretrained_rollouts("stage 1: pretrained rollouts"):
            xs.append(traj.states[0])
            rs.append(r)
        x_T, r = torch.cat(xs), torch.cat(rs)
        x_T, r = self.accelerator.gather(x_T), self.accelerator.gather(r)
        torch.manual_seed(cfg.seed + 1)  # same value network on every process
        self.value_function = ValueFunction(self.sample_shape, cfg.alpha, hidden=cfg.aux_hidden).to(self.device)
        fit_gen = torch.Generator().manual_seed(cfg.seed + 2)
        loss = self.value_function.fit(x_T, r, steps=cfg.value_train_steps, lr=cfg.value_learning_rate,
                                       generator=fit_gen, progress=self.is_main_process)
        self.value_function.requires_grad_(False)
        metrics = {"value/loss": loss, "value/pretrained_reward_mean": float(r.mean()),
                   "value/shift": float(self.value_function.shift)}
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
        params = list(self.initial_noise.parameters())
        opt = torch.optim.Adam(params, lr=cfg.noise_learning_rate)
        metrics = {}
        for it in self._progress(range(cfg.noise_train_steps), "stage 2: initial noise"):
            x_T, kl = self.initial_noise(cfg.noise_batch_size, generator=self.generator, device=self.device)
            u = self.value_function.normalized(x_T)
            loss = (kl - u).mean()  # = -(E[v_T] - alpha KL) / alpha, up to the constant shift
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self._sync_grads(params)
            opt.step()
            if it % cfg.log_every == 0 or it == cfg.noise_train_steps - 1:
                metrics = {"noise/loss": loss.item(), "noise/kl": kl.mean().item(),
                           "noise/value": float(self.value_function.shift + cfg.alpha * u.detach().mean())}
                self._log(metrics, step=it)
        self.initial_noise.requires_grad_(False)
        self.initial_noise_trained = True
        return metrics

    # ------------------------------------------------------------------ stage 3
    def fit_step_values(self) -> dict:
        """Feynman--Kac regression of ``V_k`` at every step on ``value_num_rollouts`` pretrained rollouts from
        ``N(0, I)`` (:mod:`hf_control_ft.models.step_values`); used by ``drift_objective="value_guided"``."""
        cfg = self.config
        K = len(self.schedule)
        states, rs = [[] for _ in range(K)], []
        for traj, r in self._pretrained_rollouts("step values: pretrained rollouts"):
            rs.append(r)
            for k in range(K):
                states[k].append(traj.states[k])
        states = [self.accelerator.gather(torch.cat(s)) for s in states]
        r = self.accelerator.gather(torch.cat(rs))
        times = self.schedule.timesteps.float() / self.schedule.scheduler.config.num_train_timesteps
        torch.manual_seed(cfg.seed + 3)  # same network on every process
        self.step_values = StepValueFunction(self.sample_shape, cfg.alpha, times, hidden=cfg.aux_hidden).to(self.device)
        loss = self.step_values.fit(states, r, steps=cfg.step_value_train_steps, lr=cfg.value_learning_rate,
                                    generator=torch.Generator().manual_seed(cfg.seed + 4),
                                    progress=self.is_main_process)
        metrics = {"step_values/loss": loss}
        self._log(metrics, step=self.global_step)
        return metrics

    def reward_and_gradient(self, samples: torch.Tensor):
        """Checked reward ``(B,)`` of ``samples`` and its gradient ``dr/dx_0`` (shape of ``samples``)."""
        x0 = samples.detach().requires_grad_(True)
        with torch.enable_grad():
            r = self._reward(x0, require_grad=True)
            (grad,) = torch.autograd.grad(r.sum(), x0)
        return r.detach(), grad

    def drift_step(self, optimizer, params) -> dict:
        """One stage-3 iteration; returns its metrics.

        ``drift_objective="pathwise"``: exact gradient of ``mean(-r + alpha * (KL_drift + KL_init))``
        (``train/loss`` is its value). ``"adjoint_matching"``: the regression of
        :func:`~hf_control_ft.core.adjoint_matching.adjoint_matching_backward` (``train/loss`` is the regression loss);
        ``"value_guided"``: the same regression with ``grad V_{k+1}`` of :meth:`fit_step_values` as target;
        reward, exact KL and objective are logged the same way for both.
        """
        cfg = self.config
        B = cfg.batch_size
        self._prepare_batch(B)
        x_T, kl_init = self.draw_initial_noise(B)
        traj = self.sampler.rollout(x_T, self.generator)
        r, grad_x0 = self.reward_and_gradient(traj.samples)
        optimizer.zero_grad(set_to_none=True)
        if cfg.drift_objective in ("adjoint_matching", "value_guided"):
            value_gradient = None
            if cfg.drift_objective == "value_guided":
                if self.step_values is None:
                    self.fit_step_values()
                value_gradient = self.step_values.gradient
            am_loss = adjoint_matching_backward(self.sampler, traj, grad_x0, cfg.alpha, 1.0 / B, value_gradient)
        else:
            self.sampler.backpropagate(traj, -grad_x0 / B, cfg.alpha / B)
        self._sync_grads(params)
        grad_norm = self._clip(params)
        optimizer.step()
        kl = traj.kl  # exact path KL of the rollout's fine-tuned chain (both objectives fill every step)
        objective = (r - cfg.alpha * (kl + kl_init)).mean().item()
        metrics = {"train/reward": r.mean().item(), "train/kl": kl.mean().item(),
                   "train/kl_init": kl_init.mean().item(), "train/objective": objective, "train/loss": -objective,
                   "train/grad_norm": grad_norm}
        if cfg.drift_objective != "pathwise":
            metrics["train/loss"] = metrics["train/adjoint_matching_loss"] = am_loss.mean().item()
        return metrics

    def reward_backprop_step(self, optimizer) -> None:
        """The no-KL baseline iteration (AlignProp / DRaFT): ``x_T ~ N(0, I)``, reward backpropagation through
        the same sampler and backward sweep, no KL terms, no initial-noise model. The step-cost benchmarks
        time it as the reference cost of an ELEGANT iteration."""
        B = self.config.batch_size
        self._prepare_batch(B)
        x_T = torch.randn((B, *self.sample_shape), generator=self.generator).to(self.device)
        traj = self.sampler.rollout(x_T, self.generator)
        _, grad_x0 = self.reward_and_gradient(traj.samples)
        optimizer.zero_grad(set_to_none=True)
        self.sampler.backpropagate(traj, -grad_x0 / B, None)
        optimizer.step()

    def train_drift(self) -> dict:
        """Stage 3: LoRA drift training for ``config.train_steps`` iterations."""
        cfg = self.config
        params = lora_parameters(self.model)
        if not params:
            raise RuntimeError("no trainable LoRA parameters found on the model")
        if cfg.drift_objective == "value_guided" and self.step_values is None:
            self.fit_step_values()
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        lr_schedule = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps,
                                    num_training_steps=cfg.train_steps)
        if self._optimizer_state is not None:  # resuming: restore moments and the schedule position
            tensors, meta = self._optimizer_state
            checkpointing.load_optimizer_state(opt, tensors, meta["optimizer"])
            lr_schedule.load_state_dict(meta["lr_schedule"])
            self._optimizer_state = None
        metrics = {}
        bar = self._progress(range(self.global_step, cfg.train_steps), "stage 3: drift")
        for _ in bar:
            # the randomness of step n depends on (seed, rank, n) only, so a resumed run repeats it exactly
            self.generator.manual_seed(self._step_seed(self.global_step))
            metrics = self.drift_step(opt, params)
            metrics["train/lr"] = lr_schedule.get_last_lr()[0]
            lr_schedule.step()
            self.global_step += 1
            if self.global_step % cfg.log_every == 0 or self.global_step == cfg.train_steps:
                metrics = {k: float(self.accelerator.reduce(torch.tensor(v, device=self.device), "mean"))
                           for k, v in metrics.items()}
                self._log(metrics, step=self.global_step)
                if self.is_main_process:
                    bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", kl=f"{metrics['train/kl']:.3f}")
            if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                self.save_checkpoint(opt, lr_schedule)
        return metrics

    def _step_seed(self, step: int) -> int:
        """A 63-bit seed hashed from (seed, rank, step): independent of every other stream the trainer uses."""
        key = f"hf_control_ft/drift/{self.config.seed}/{self.accelerator.process_index}/{step}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, optimizer=None, lr_schedule=None) -> str | None:
        """Writes ``<output_dir>/checkpoint-<global_step>`` (main process; atomic rename; rotation to
        ``checkpoints_total_limit``). Returns its path on the main process."""
        cfg = self.config
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main_process:
            tmp = checkpointing.begin(cfg.output_dir, self.global_step)
            weights = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(self.model).items()}
            save_file(weights, os.path.join(tmp, "lora.safetensors"))
            state = {"global_step": self.global_step, "initial_noise_trained": self.initial_noise_trained,
                     "history": self.history}
            if optimizer is not None:
                tensors, meta = checkpointing.optimizer_state_tensors(optimizer)
                save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
                state["optimizer"] = meta
                state["lr_schedule"] = lr_schedule.state_dict()  # JSON-able: LambdaLR stores no functions
            if self.initial_noise is not None and self.initial_noise_trained:
                self.initial_noise.save_pretrained(os.path.join(tmp, INITIAL_NOISE_DIR))
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
            path = checkpointing.commit(cfg.output_dir, self.global_step, cfg.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restores what :meth:`save_checkpoint` wrote; training continues at its ``global_step``."""
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        load_lora_state_dict(self.model, load_file(os.path.join(path, "lora.safetensors"), device=str(self.device)))
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
        self.initial_noise_trained = bool(state.get("initial_noise_trained", False))
        if self.initial_noise is not None and self.initial_noise_trained:
            self.initial_noise = InitialNoiseModel.from_pretrained(os.path.join(path, INITIAL_NOISE_DIR)).to(self.device)
            self.initial_noise.requires_grad_(False)
        if "optimizer" in state:
            tensors = load_file(os.path.join(path, "optimizer.safetensors"), device=str(self.device))
            self._optimizer_state = (tensors, state)

    def train(self, resume_from_checkpoint: str | None = None) -> dict:
        """Runs stages 1-3 (1-2 only with ``learn_initial_noise``); returns final metrics and timings.

        ``resume_from_checkpoint``: ``"latest"`` (newest checkpoint in ``config.output_dir``, or a fresh start when
        there is none) or a checkpoint path. Stages already finished there are not repeated, and the drift
        stage continues at the checkpoint's step with the same randomness an uninterrupted run would use.
        """
        cfg = self.config
        checkpoint = checkpointing.resolve_checkpoint(cfg.output_dir, resume_from_checkpoint)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        self._start_trackers()
        summary, t0 = {"resumed_from": checkpoint}, time.perf_counter()
        if self.initial_noise is not None and not self.initial_noise_trained:
            summary.update(self.fit_value_function())
            summary.update(self.train_initial_noise())
            if cfg.checkpointing_steps:
                self.save_checkpoint()  # checkpoint-0: stages 1-2 are never repeated after a crash
        t1 = time.perf_counter()
        summary.update(self.train_drift())
        t2 = time.perf_counter()
        summary.update({"time/stages_1_2_s": t1 - t0, "time/drift_s": t2 - t1})
        self.accelerator.wait_for_everyone()
        if self.accelerator.log_with:
            self.accelerator.end_training()  # flush and close the trackers
            self._trackers_started = False
        return summary

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None, batch_size: int | None = None,
               controlled: bool = True) -> torch.Tensor:
        """Draws samples: learned initial noise + LoRA control (``controlled=False``: the pretrained model
        from ``N(0, I)``). Deterministic given ``generator``. Returns ``(num_samples, *sample_shape)``."""
        gen = generator if generator is not None else torch.Generator().manual_seed(self.config.seed)
        bs = batch_size or self.config.batch_size
        out = []
        for start in range(0, num_samples, bs):
            b = min(bs, num_samples - start)
            self._prepare_batch(b, gen)
            if controlled:
                x_T, _ = self.draw_initial_noise(b, gen)
            else:
                x_T = torch.randn((b, *self.sample_shape), generator=gen).to(self.device)
            out.append(self.sampler.sample(x_T, gen, controlled=controlled))
        return torch.cat(out)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str, metrics: dict | None = None, sample_grid=None,
                        base_model: str | None = None, repo_id: str | None = None) -> None:
        """Writes the adapter (``pytorch_lora_weights.safetensors``, diffusers format with metadata), the
        initial-noise model, the config and a model card ``README.md`` (see :mod:`hf_control_ft.serialization.saved`).

        Args:
            metrics: ``{name: value}`` for the card's metrics table.
            sample_grid: PIL image or path of a PNG, copied to ``sample_grid.png`` and shown in the card.
            base_model: Hub id / path of the base model, for the card and the loading snippets.
            repo_id: Hub repo the card's loading snippets refer to.

        Only the main process writes.
        """
        if not self.is_main_process:
            return
        save_trainer(self, save_directory, metrics=metrics, sample_grid=sample_grid, base_model=base_model,
                     repo_id=repo_id)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    commit_message: str = "Upload ELEGANT fine-tuned model", save_directory: str | None = None,
                    metrics: dict | None = None, sample_grid=None, base_model: str | None = None,
                    endpoint: str | None = None):
        """Saves (to ``save_directory``, or a temporary one) and uploads everything to ``repo_id`` in one
        commit, creating the repo if needed. Returns the ``CommitInfo`` (``None`` off the main process).

        Raises:
            hf_control_ft.serialization.saved.HubPushError: with the Hub's message; ``save_directory`` is kept.
        """
        if not self.is_main_process:
            return None
        import contextlib
        import tempfile

        target = (contextlib.nullcontext(save_directory) if save_directory is not None
                  else tempfile.TemporaryDirectory())
        with target as directory:
            self.save_pretrained(directory, metrics, sample_grid, base_model, repo_id)
            return push_directory(directory, repo_id, private, token, commit_message, endpoint)

    def _peft_config(self):
        if self.lora_config is not None:
            return self.lora_config
        peft_cfg = getattr(self.model, "peft_config", None)  # adapter added by the caller
        if isinstance(peft_cfg, dict) and CONTROL_ADAPTER in peft_cfg:
            return peft_cfg[CONTROL_ADAPTER]
        raise RuntimeError(f"cannot find the LoraConfig of the {CONTROL_ADAPTER!r} adapter on the model")

    @classmethod
    def from_pretrained(cls, directory: str, model: torch.nn.Module, scheduler, reward_fn=None,
                        accelerator: Accelerator | None = None, **config_overrides) -> "ElegantTrainer":
        """Rebuilds a trainer from :meth:`save_pretrained` output (a directory or a Hub repo id) on a fresh
        copy of the base ``model``.

        The adapter is re-created from the LoRA file's metadata (rank, lora_alpha, targets) and its weights
        loaded; the initial-noise model comes from ``initial_noise/``.
        """
        from ..serialization.saved import resolve_directory

        saved = read_saved(resolve_directory(directory))
        config = ElegantConfig.from_dict(saved["config"], **config_overrides)
        trainer = cls(config, model, scheduler, reward_fn, saved["sample_shape"], accelerator=accelerator)
        state, _ = load_lora_file(saved["lora_path"])
        load_lora_state_dict(trainer.model, state)
        if config.learn_initial_noise:
            trainer.initial_noise = InitialNoiseModel.from_pretrained(saved["initial_noise_dir"]).to(trainer.device)
        return trainer

    @classmethod
    def from_pipeline(cls, pipeline, reward_fn, config: ElegantConfig, prompts, accelerator=None, **options):
        """ELEGANT on a diffusers ``StableDiffusionPipeline`` (text-conditioned, classifier-free guidance).

        Args:
            pipeline: the base pipeline; its UNet gets the LoRA control adapter (diffusers ``add_adapter``).
            reward_fn: ``reward_fn(images, prompts) -> (B,)`` on decoded images in ``[0, 1]``.
            config: :class:`ElegantConfig`.
            prompts: a list of prompts, a text file (one per line) or a ``datasets`` dataset.
            **options: fields of :class:`hf_control_ft.processes.stable_diffusion.StableDiffusionOptions`
                (``guidance_scale``, ``negative_prompt``, ``height``, ``width``, ``mixed_precision``,
                ``base_model``, ``prompt_column``).

        Returns:
            a :class:`hf_control_ft.processes.stable_diffusion.StableDiffusionElegantTrainer`.
        """
        from ..processes.stable_diffusion import StableDiffusionElegantTrainer, StableDiffusionOptions

        if options.get("base_model") is None:
            options["base_model"] = getattr(pipeline, "name_or_path", None) or None
        return StableDiffusionElegantTrainer(pipeline, reward_fn, config, prompts, StableDiffusionOptions(**options),
                                             accelerator=accelerator)
