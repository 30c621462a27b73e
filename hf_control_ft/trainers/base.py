"""What ELEGANT and SEIKO share: one base class over a controlled process.

:class:`BaseTrainer` owns the accelerator, the trackers, progress bars, gradient synchronisation and clipping,
the drift optimiser and its learning-rate schedule, the per-process random stream, and the three operations
both algorithms are built from:

* :meth:`~BaseTrainer.sample`: conditions per batch, initial noise, the controlled chain;
* :meth:`~BaseTrainer.fit_initial_noise`: stage 2 (``docs/algorithms.md`` §4), optionally with the KL to a
  second, frozen initial-noise model (SEIKO's previous round);
* :meth:`~BaseTrainer.drift_iteration`: one stage-3 step (``docs/algorithms.md`` §7), optionally with the KL to
  a frozen reference adapter (SEIKO's previous round) -- in :mod:`.drift`.

Subclasses add their own loop (ELEGANT's three stages, SEIKO's rounds) and persistence. The process
(:mod:`hf_control_ft.processes`) is the only thing that knows the network, its conditioning and its decoding.
"""

from __future__ import annotations

import contextlib
import tempfile

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..rewards.checks import check_reward, reward_name
from ..serialization.saved import push_directory
from .drift import DriftIterations
from .ema import LoraEMA
from .trackers import check_trackers, tracker_names


class BaseTrainer(DriftIterations):
    """Shared machinery of the trainers (not used directly).

    Args:
        config: the algorithm's config (an :class:`~hf_control_ft.trainers.elegant_config.ElegantConfig` or
            subclass).
        accelerator: an ``accelerate.Accelerator``; one is created from the config if omitted.

    Subclasses set :attr:`process`, :attr:`sampler`, :attr:`initial_noise` and :attr:`reward_fn`.
    """

    def __init__(self, config, accelerator: Accelerator | None = None):
        self.config = config
        log_with = tracker_names(config.report_to)
        if accelerator is None:
            check_trackers(config.report_to)
        self.accelerator = accelerator or Accelerator(log_with=log_with, project_dir=config.logging_dir or "runs")
        self.device = self.accelerator.device
        self.history: list[dict] = []
        #: per-tracker keyword arguments for ``accelerator.init_trackers`` (e.g. ``{"wandb": {"entity": ...}}``)
        self.tracker_init_kwargs: dict = {}
        self._trackers_started = False
        self.process = None
        self.sampler = None
        self.initial_noise = None
        self.reward_fn = None
        self.reward_name = None
        self.ema = None  # --use_ema: the moving average of the LoRA weights (trainers/ema.py), made with the optimiser
        self._ema_state = None  # its state from a checkpoint, applied when the average is made
        self.skipped_steps = 0  # drift steps skipped for a non-finite gradient
        self._nonfinite_in_row = 0
        # per-process stream of training randomness
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.accelerator.process_index + 1)

    # ------------------------------------------------------------------ process views
    @property
    def model(self) -> torch.nn.Module:
        """The network the sampler calls (with its LoRA adapters)."""
        return self.process.model

    @property
    def schedule(self):
        return self.process.schedule

    @property
    def sample_shape(self) -> tuple:
        return self.process.sample_shape

    @property
    def lora_config(self):
        return self.process.peft_config()

    @property
    def condition_dim(self) -> int:
        """Width of the condition of the initial noise and the stage-1 value (0: prompt-agnostic start law)."""
        return self.process.condition_dim if self.config.conditional_initial_noise else 0

    def batch_condition(self, conditions=None) -> torch.Tensor | None:
        """Features ``(B, condition_dim)`` of ``conditions`` (default: the current batch's) for the initial noise
        and the stage-1 value, or ``None`` (unconditional process, or ``conditional_initial_noise=False``)."""
        return self.process.condition_features(conditions) if self.condition_dim else None

    def step_condition(self) -> torch.Tensor | None:
        """Features of the current batch for the per-step values: always conditional on a conditional process
        (a prompt-agnostic ``V_k`` would guide every prompt toward the prompt-averaged target)."""
        return self.process.condition_features() if self.process.condition_dim else None

    def set_reward(self, reward_fn) -> None:
        """Sets the reward the drift maximises (the user's function on what the process decodes to)."""
        self.reward_fn = self.process.reward_function(reward_fn) if reward_fn is not None else None
        self.reward_name = reward_name(reward_fn) if reward_fn is not None else None
        self._user_reward = reward_fn

    def reward_terms(self, prefix: str = "train/reward/") -> dict:
        """A weighted mix's per-term means since the last call (``{prefix + name: mean}``; empty otherwise)."""
        pop = getattr(getattr(self, "_user_reward", None), "pop_term_means", None)
        return {prefix + k: v for k, v in pop().items()} if pop is not None else {}

    # ------------------------------------------------------------------ logging and progress
    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _progress(self, iterable, desc, **kwargs):
        return tqdm(iterable, desc=desc, disable=not self.is_main_process, **kwargs)

    def _start_trackers(self) -> None:
        if not self._trackers_started and self.accelerator.log_with:
            cfg = {k: (str(v) if isinstance(v, (list, type(None))) else v) for k, v in self.config.to_dict().items()}
            self.accelerator.init_trackers(self.config.tracker_project_name, config=cfg,
                                           init_kwargs=self.tracker_init_kwargs)
        self._trackers_started = True

    def _end_trackers(self) -> None:
        """Flushes and closes the trackers. Not ``accelerator.end_training()``: that also destroys the process
        group, which belongs to the user's script (collectives after ``train()`` would race a torn-down group)."""
        if self.accelerator.log_with and self._trackers_started:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
        self._trackers_started = False

    def _log(self, metrics: dict, step: int) -> None:
        self.history.append({"step": step, **metrics})
        self.accelerator.log(metrics, step=step)

    # ------------------------------------------------------------------ gradients and optimiser
    def _sync_grads(self, params) -> None:
        """Averages gradients over processes (the model is not DDP-wrapped: the sampler calls it many times)."""
        if self.accelerator.num_processes > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def _clip(self, params) -> float:
        """Clips to ``max_grad_norm`` (when set); returns the gradient norm before clipping."""
        if self.config.max_grad_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))

    def make_optimizer(self, params):
        """``(AdamW, LR schedule)`` of the drift stage from the config."""
        cfg = self.config
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=getattr(cfg, "adam_weight_decay", 0.0))
        if getattr(cfg, "use_ema", False):
            self.ema = LoraEMA(params, cfg.ema_decay)
            if self._ema_state is not None:
                self.ema.load_state_dict(self._ema_state)
                self._ema_state = None
        schedule = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.train_steps)
        return opt, schedule

    # ------------------------------------------------------------------ rewards and initial noise
    def _reward(self, x: torch.Tensor, require_grad: bool) -> torch.Tensor:
        return check_reward(self.reward_fn(x), x.shape[0], self.reward_name, require_grad=require_grad)

    def reward_and_gradient(self, samples: torch.Tensor):
        """Checked reward ``(B,)`` of ``samples`` and its gradient ``dr/dx_0`` (shape of ``samples``)."""
        x0 = samples.detach().requires_grad_(True)
        with torch.enable_grad():
            r = self._reward(x0, require_grad=True)
            (grad,) = torch.autograd.grad(r.sum(), x0)
        return r.detach(), grad

    def draw_initial_noise(self, num_samples: int, generator: torch.Generator | None = None,
                           condition: torch.Tensor | None = None):
        """``(x_T, kl_init)`` without autograd: from the learned model if any (given the batch's ``condition``
        features for a conditional start law), else ``N(0, I)`` (KL 0)."""
        gen = generator if generator is not None else self.generator
        with torch.no_grad():
            if self.initial_noise is not None:
                x_T, kl = self.initial_noise(num_samples, generator=gen, device=self.device, condition=condition)
            else:
                x_T = torch.randn((num_samples, *self.sample_shape), generator=gen).to(self.device)
                kl = torch.zeros(num_samples, device=self.device)
        return x_T, kl

    def fit_initial_noise(self, value, steps: int, generator: torch.Generator, reference=None,
                          reference_weight: float = 0.0, log_prefix: str | None = "noise", desc: str = "initial noise",
                          log_step_offset: int = 0):
        """Stage 2: maximise ``E[v_T(x_T)] - alpha * KL`` over :attr:`initial_noise` (``docs/algorithms.md`` §4).

        ``value`` is a fitted :class:`~hf_control_ft.models.value_function.ValueFunction` whose temperature is
        the total KL weight. With a frozen ``reference`` initial-noise model the KL term is
        ``(1 - w) KL(nu || N(0, I)) + w KL_path(nu || reference)`` with ``w = reference_weight`` (SEIKO:
        ``beta / (alpha + beta)``). Logs every ``log_every`` iterations under ``log_prefix`` (``None``: no logs),
        at tracker step ``log_step_offset + iteration``. Returns the last iteration's metrics.
        """
        cfg = self.config
        self.initial_noise.requires_grad_(True)
        params = list(self.initial_noise.parameters())
        opt = torch.optim.Adam(params, lr=cfg.noise_learning_rate)
        w = float(reference_weight)
        prefix = log_prefix or "noise"
        metrics = {}
        for it in self._progress(range(steps), desc, leave=log_prefix is not None):
            # conditional start law: conditions drawn from the process's distribution (prompts, classes)
            c = self.batch_condition(self.process.draw_conditions(cfg.noise_batch_size, generator)) \
                if self.condition_dim else None
            if reference is None:
                x_T, kl = self.initial_noise(cfg.noise_batch_size, generator=generator, device=self.device,
                                             condition=c)
                kl_ref, cost = None, kl
            else:
                x_T, kl, kl_ref = self.initial_noise(cfg.noise_batch_size, generator=generator, device=self.device,
                                                     reference=reference, condition=c)
                cost = (1 - w) * kl + w * kl_ref
            u = value.normalized(x_T, c)
            loss = (cost - u).mean()  # = -(E[v_T] - alpha KL) / alpha, up to the constant shift of v_T
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self._sync_grads(params)
            opt.step()
            log = log_prefix is not None and it % cfg.log_every == 0
            if log or it == steps - 1:  # metrics only when used: .item() synchronises with the device
                metrics = {f"{prefix}/loss": loss.item(), f"{prefix}/kl": kl.mean().item()}
                if kl_ref is not None:
                    metrics[f"{prefix}/kl_previous"] = kl_ref.mean().item()
                if log_prefix is not None:
                    metrics[f"{prefix}/value"] = float(value.shift + value.alpha * u.detach().mean())
                    self._log(metrics, step=log_step_offset + it)
        self.initial_noise.requires_grad_(False)
        return metrics

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def sample(self, num_samples: int | None = None, generator: torch.Generator | None = None,
               batch_size: int | None = None, controlled: bool = True, prompts=None) -> torch.Tensor:
        """Draws samples: learned initial noise + LoRA control (``controlled=False``: the pretrained model from
        ``N(0, I)``). With ``prompts`` (conditional processes) one sample per prompt, in order; else conditions
        are drawn from the process's source with ``generator``. Deterministic given ``generator``.

        Returns ``(num_samples, *sample_shape)`` (latents for latent processes: see :meth:`decode`).
        """
        prompts, num_samples = self.process.check_conditions(prompts, num_samples)
        gen = generator if generator is not None else torch.Generator().manual_seed(self.config.seed)
        bs = batch_size or self.config.batch_size
        out = []
        with self.ema.applied() if self.ema is not None and controlled else contextlib.nullcontext():
            return self._sample_batches(num_samples, prompts, gen, bs, controlled, out)

    def _sample_batches(self, num_samples, prompts, gen, bs, controlled, out):
        for start in range(0, num_samples, bs):
            b = min(bs, num_samples - start)
            if prompts is not None:
                self.process.set_conditions(prompts[start:start + b])
            else:
                self.process.prepare_batch(b, gen)
            if controlled:
                x_T, _ = self.draw_initial_noise(b, gen, self.batch_condition())
            else:
                x_T = torch.randn((b, *self.sample_shape), generator=gen).to(self.device)
            out.append(self.sampler.sample(x_T, gen, controlled=controlled))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples -> what the reward sees (images ``(B, 3, H, W)`` in ``[0, 1]`` for latent processes)."""
        return self.process.decode(samples)

    # ------------------------------------------------------------------ Hub
    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    commit_message: str | None = None, save_directory: str | None = None,
                    metrics: dict | None = None, sample_grid=None, base_model: str | None = None,
                    endpoint: str | None = None, card_info: dict | None = None):
        """Saves (:meth:`save_pretrained`, to ``save_directory`` or a temporary one) and uploads everything to
        ``repo_id`` in one commit, creating the repo if needed. Returns the ``CommitInfo`` (``None`` off the
        main process).

        Raises:
            hf_control_ft.serialization.saved.HubPushError: with the Hub's message (the token masked); a given
                ``save_directory`` is kept.
        """
        if not self.is_main_process:
            return None
        message = commit_message or f"Upload {type(self).__name__.removesuffix('Trainer')} fine-tuned model"
        target = (contextlib.nullcontext(save_directory) if save_directory is not None
                  else tempfile.TemporaryDirectory())
        with target as directory:
            self.save_pretrained(directory, metrics=metrics, sample_grid=sample_grid, base_model=base_model,
                                 repo_id=repo_id, card_info=card_info)
            return push_directory(directory, repo_id, private, token, message, endpoint,
                                  keep_local=save_directory is not None)
