"""SEIKO: online, feedback-efficient fine-tuning of a diffusion model from an expensive oracle
(``docs/algorithms.md`` §6).

Round ``i = 1..R`` (``p_0`` = pretrained):

1. **Collect.** Draw ``B_i`` samples from ``p_{i-1}``, write them to the feedback dataset as *pending*, then ask
   the oracle in batches of ``oracle_batch_size``, persisting the dataset after every batch.
2. **Fit.** Train the reward ensemble on every answered query; build the optimistic reward ``r_hat + g``
   (UCB Gram bonus / bootstrap spread / Thompson head / greedy).
3. **Update.** Freeze the current adapter as ``"previous"`` (``p_{i-1}``) and maximise, over the ``"control"``
   adapter and the initial-noise model,

       E[r_hat(x_0) + g(x_0)] - alpha KL(P || P_pre) - beta KL(P || P_{i-1})

   where ``P`` is the *extended path*: the auxiliary initial-noise SDE followed by the sampling chain. Per
   sampling step both KLs are the exact Gaussian ones (:class:`~hf_control_ft.core.sampler.ControlledSampler` with
   ``reference_adapter="previous"``). For the initial noise, ``KL(P || P_pre)`` contributes
   ``sum_j ||g_phi||^2 ds / 2`` (to the driftless SDE, i.e. to ``N(0, I)``) and ``KL(P || P_{i-1})``
   contributes ``sum_j ||g_phi - g_{i-1}||^2 ds / 2`` (to the previous round's frozen initial-noise SDE).

   The initial-noise stage fits the soft value of the combined problem on rollouts of the geometric-mixture
   reference chain ``mu_mix = (a mu_pre + b mu_prev) / (a+b)`` with running cost
   ``c_k = a b / (a+b) ||mu_pre - mu_prev||^2 / (2 s^2)`` (derivation: ``docs/algorithms.md`` §6); the fixed
   point is ``p_i ∝ exp((r_hat+g)/(a+b)) p_pre^(a/(a+b)) p_{i-1}^(b/(a+b))``.

No feedback is lost: every answer is on disk before it is used (:mod:`hf_control_ft.feedback.store`), and the
per-round state is saved after each round (:mod:`hf_control_ft.trainers.seiko_state`). Restarting with the same
``output_dir`` resumes after the last completed round; all randomness comes from ``(seed, round, phase)``
generators, so a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import math
import os
import time

import torch
from accelerate import Accelerator

from ..core.control import CONTROL_ADAPTER, add_reference_adapter, copy_adapter_weights, lora_parameters
from ..feedback.oracle import Oracle, RoundBudget
from ..feedback.store import FeedbackDataset
from ..models.initial_noise import InitialNoiseModel
from ..models.reward_ensemble import OptimisticReward, RewardEnsemble
from ..models.value_function import ValueFunction
from ..processes import ControlledProcess, process_from_pipeline
from ..serialization.saved import save_control
from .base import BaseTrainer
from .distributed import broadcast_tensors, lock_on_main, run_on_main, tensors_from_main
from .drift import logged_kls
from .seiko_collect import FeedbackCollection
from .seiko_config import SeikoConfig
from .seiko_state import (
    FEEDBACK_DIR,
    PREVIOUS_ADAPTER,
    SEIKO_CONFIG_NAME,
    check_resume_config,
    load_round_state,
    mixture_rollout,
    replace_run,
    round_generator,
    round_seed,
    save_round_state,
    state_store,
)


class SeikoTrainer(FeedbackCollection, BaseTrainer):
    """Online fine-tuning of a controlled process from ``oracle`` feedback with SEIKO.

    Args:
        config: :class:`SeikoConfig` (``config.output_dir`` holds the feedback and the resumable state).
        model: denoiser ``model(sample, timestep, **model_kwargs)``; gets a trainable ``"control"`` LoRA adapter
            and a frozen ``"previous"`` copy of it. Base weights are frozen.
        scheduler: diffusers ``DDPMScheduler`` or ``DDIMScheduler``.
        oracle: an :class:`~hf_control_ft.feedback.oracle.Oracle` or a plain callable ``fn(samples, prompts) ->
            values`` (wrapped with the config's failure policy). Need not be differentiable.
        sample_shape: shape of one sample.
        accelerator: optional ``accelerate.Accelerator``. Under ``accelerate launch`` with several processes each
            process samples its share of every round's queries and of every training batch (gradients averaged);
            the main process alone writes the feedback dataset and asks the oracle, so every sample is sent once.
        model_kwargs: extra keyword arguments for every denoiser call.
        feature_extractor, feature_dim: embedding of samples for the reward heads (default: raw flattened
            samples; for a pipeline, image features of the decoded latents).
        process: a ready :class:`~hf_control_ft.processes.ControlledProcess` instead of
            ``model`` / ``scheduler`` / ``sample_shape`` (:meth:`from_pipeline` builds one from a pipeline).
    """

    def __init__(self, config: SeikoConfig, model: torch.nn.Module | None = None, scheduler=None, oracle=None,
                 sample_shape=None, accelerator: Accelerator | None = None, model_kwargs: dict | None = None,
                 feature_extractor=None, feature_dim: int | None = None, process: ControlledProcess | None = None):
        if not isinstance(config, SeikoConfig):
            raise TypeError(f"config must be a SeikoConfig, got {type(config).__name__}")
        if oracle is None:
            raise ValueError("SeikoTrainer needs an oracle")
        if config.logging_dir is None:
            config.logging_dir = os.path.join(config.output_dir, "logs")
        super().__init__(config, accelerator)
        torch.manual_seed(config.seed)  # identical adapter / network init on every process
        if process is None:
            if model is None or scheduler is None or sample_shape is None:
                raise ValueError("pass model, scheduler and sample_shape, or a process")
            process = ControlledProcess(model.to(self.device), scheduler, sample_shape, config, model_kwargs)
        self.process = process.to(self.device)
        if config.learn_initial_noise:
            self.initial_noise = InitialNoiseModel(self.sample_shape, num_steps=config.noise_num_steps,
                                                   hidden=config.aux_hidden,
                                                   cond_dim=self.condition_dim).to(self.device)
        add_reference_adapter(process.lora_model, PREVIOUS_ADAPTER, source=CONTROL_ADAPTER)
        self.sampler = process.make_sampler(reference_adapter=PREVIOUS_ADAPTER)
        self.previous_noise = copy.deepcopy(self.initial_noise).requires_grad_(False) if self.initial_noise else None
        self.oracle = oracle if isinstance(oracle, Oracle) else Oracle(
            oracle, on_failure=config.oracle_on_failure, max_retries=config.oracle_max_retries,
            timeout=config.oracle_timeout)
        self.budget = RoundBudget(config.budgets(), config.num_rounds)
        self.feature_extractor, self.feature_dim = process.reward_features(feature_extractor, feature_dim,
                                                                           chunk_size=config.batch_size)
        self.output_dir = config.output_dir
        #: the feedback dataset (:class:`FeedbackDataset`); on the main process only (``None`` on the others)
        self.feedback: FeedbackDataset | None = None
        self._state_store = None
        self.reward: OptimisticReward | None = None
        # the run lock is taken *before* the run directory is read: never a view that another live run (a requeued
        # job, a second notebook cell) may be changing. Held until train() ends or close().
        self._replaced = False  # overwrite_output_dir moves an earlier run aside once, not at every train()
        self._lock, self._holds_lock = lock_on_main(self.accelerator, self.output_dir), True
        try:
            self._open_and_load()
        except BaseException:
            self.close()
            raise

    def _open_and_load(self) -> None:
        """Reads the run directory (feedback, settings, last round's state); the caller holds the run lock."""
        self._num_queries = run_on_main(self.accelerator, self._open_run_directory)
        self.completed_rounds = 0
        self.global_step = 0
        self._load_state()

    def close(self) -> None:
        """Releases the run lock (``train()`` does at its end; a later ``train()`` takes it and re-reads the run)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
        self._lock, self._holds_lock = None, False

    __del__ = close

    @classmethod
    def from_pipeline(cls, pipeline, oracle, config: SeikoConfig, prompts, accelerator: Accelerator | None = None,
                      feature_extractor=None, feature_dim: int | None = None, **options):
        """SEIKO on a diffusers pipeline (``StableDiffusionPipeline``), through its controlled process.

        Args:
            pipeline: the base pipeline; its UNet gets the ``"control"`` and ``"previous"`` LoRA adapters.
            oracle: ``oracle(images, prompts) -> (B,)`` on decoded images ``(B, 3, H, W)`` in ``[0, 1]``.
            config: :class:`SeikoConfig`.
            prompts: a list of prompts, a text file (one per line) or a ``datasets`` dataset; every query draws
                its prompt uniformly from it, and the prompt is stored with the query's latent.
            feature_extractor: differentiable ``images -> (B, D)`` embedding for the reward heads (e.g. a frozen
                CLIP image tower); default
                :class:`hf_control_ft.processes.stable_diffusion_features.PooledPixelFeatures`.
            feature_dim: ``D`` (inferred with one decode when omitted).
            **options: fields of :class:`hf_control_ft.processes.StableDiffusionOptions`.
        """
        if not isinstance(config, SeikoConfig):
            raise TypeError(f"config must be a SeikoConfig, got {type(config).__name__}")
        process = process_from_pipeline(pipeline, config, prompts, **options)
        return cls(config, oracle=oracle, accelerator=accelerator, feature_extractor=feature_extractor,
                   feature_dim=feature_dim, process=process)

    @property
    def num_queries(self) -> int:
        """Queries in the feedback dataset (on every process; the dataset itself lives on the main process)."""
        return len(self.feedback) if self.feedback is not None else self._num_queries

    @property
    def prompts(self):
        """The prompt source of a text-conditioned process (``None`` for unconditional ones)."""
        return getattr(self.process, "prompts", None)

    # ------------------------------------------------------------------ state (per round)
    def _open_run_directory(self) -> int:
        """Main process: with ``overwrite_output_dir`` moves an existing run aside (once per trainer: its answers
        are kept, unused); opens the feedback dataset and the state versions and checks a resumed run's settings;
        returns the number of stored queries."""
        if self.config.overwrite_output_dir and not self._replaced:
            replace_run(self.output_dir)
        self._replaced = True
        self._state_store = state_store(self.output_dir)  # creates output_dir
        self.feedback = FeedbackDataset(os.path.join(self.output_dir, FEEDBACK_DIR), self.sample_shape)
        started = max(self.feedback.columns["round"], default=0)
        check_resume_config(self.config, self.output_dir, started, self.process.run_settings())
        return len(self.feedback)

    def _rank_generator(self, round_index: int, phase: str) -> torch.Generator:
        """This process's generator of one phase of one round (process 0: the single-process stream)."""
        return round_generator(self.config.seed, round_index, phase, self.accelerator.process_index)

    def _synced_tensors(self) -> list[torch.Tensor]:
        """Everything that must be identical on every process: both adapters and both initial-noise models."""
        tensors = lora_parameters(self.model, CONTROL_ADAPTER) + lora_parameters(self.model, PREVIOUS_ADAPTER)
        for module in (self.initial_noise, self.previous_noise):
            if module is not None:
                tensors += list(module.state_dict(keep_vars=True).values())
        return tensors

    def save_state(self) -> str:
        """Writes the resumable state after a completed round (safetensors + JSON) and switches to it atomically
        (main process; the path is returned on every process)."""

        def write():
            counters = {"completed_rounds": self.completed_rounds, "global_step": self.global_step,
                        "feedback_version": self.feedback.version, "oracle_calls": self.oracle.num_calls}
            return save_round_state(self._state_store, self.model, self.initial_noise, self.previous_noise, counters)

        return run_on_main(self.accelerator, write)

    def _load_state(self) -> None:
        """Loads the last completed round's state on the main process and sends it to the others (which also
        makes freshly initialised adapters identical everywhere)."""
        state = run_on_main(self.accelerator, load_round_state, self._state_store, self.model, self.initial_noise,
                            self.previous_noise)
        broadcast_tensors(self.accelerator, self._synced_tensors())
        if state is not None:
            self.completed_rounds = int(state["completed_rounds"])
            self.global_step = int(state["global_step"])

    # ------------------------------------------------------------------ 2. fit
    def fit_reward(self, round_index: int) -> dict:
        """Fits the reward ensemble on every answered query and sets :attr:`reward` (the optimistic reward)."""
        cfg = self.config
        x, y = tensors_from_main(self.accelerator, lambda: self.feedback.training_data())
        gen = round_generator(cfg.seed, round_index, "reward")
        ensemble = RewardEnsemble(self.sample_shape, cfg.ensemble_size, cfg.reward_hidden, cfg.reward_depth,
                                  self.feature_extractor, self.feature_dim,
                                  feature_std_floor=cfg.feature_std_floor).to(self.device)
        loss = ensemble.fit(x, y, bootstrap=cfg.optimism in ("bootstrap", "ts"), steps=cfg.reward_train_steps,
                            lr=cfg.reward_learning_rate, weight_decay=cfg.reward_weight_decay,
                            batch_size=cfg.reward_batch_size, generator=gen)
        head = None
        if cfg.optimism == "ucb":
            ensemble.fit_gram(x, cfg.ucb_ridge)
        elif cfg.optimism == "ts":
            ts_gen = round_generator(cfg.seed, round_index, "ts")
            head = int(torch.randint(0, cfg.ensemble_size, (1,), generator=ts_gen))
        # every process fitted the same data with the same generator; the main process's heads are authoritative
        broadcast_tensors(self.accelerator, ensemble.state_dict(keep_vars=True).values())
        self.reward = OptimisticReward(ensemble, cfg.optimism, cfg.bonus_scale, head, bonus_cap=cfg.bonus_cap,
                                       temperature=cfg.alpha + cfg.beta)
        self.reward_fn = self.reward  # on samples directly: the heads' features decode latents themselves
        self.reward_name = self.reward.__name__
        with torch.no_grad():
            r_hat, bonus = self.reward.parts(x.to(self.device))
        return {"reward_model/loss": loss, "reward_model/num_train": int(x.shape[0]),
                "reward_model/bonus_on_data": float(bonus.mean()), "reward_model/rmse_on_data":
                float((r_hat.cpu() - y).pow(2).mean().sqrt())}

    # ------------------------------------------------------------------ 3. update
    def reference_rollout(self, x_T: torch.Tensor, generator: torch.Generator):
        """Rollout of the geometric-mixture reference chain from ``x_T``: ``(x_0, cost)`` (:func:`mixture_rollout`)."""
        return mixture_rollout(self.sampler, self.config.alpha, self.config.beta, x_T, generator)

    def train_initial_noise(self, round_index: int) -> dict:
        """Value of the combined problem by Feynman--Kac on the mixture chain, then the initial-noise model."""
        cfg = self.config
        a, b = cfg.alpha, cfg.beta
        gen = self._rank_generator(round_index, "value")
        xs, targets, cs = [], [], []
        n = math.ceil(cfg.value_num_rollouts / self.accelerator.num_processes)  # this process's rollouts
        for start in self._progress(range(0, n, cfg.batch_size), f"round {round_index}: value rollouts", leave=False):
            m = min(cfg.batch_size, n - start)
            half = m // 2  # cover both N(0, I) and the previous initial law, where nu_i will put its mass
            self.process.prepare_batch(m, gen)  # conditional models: this batch's prompts
            c = self.batch_condition()
            x_T = torch.cat([torch.randn((m - half, *self.sample_shape), generator=gen).to(self.device),
                             self.previous_noise.sample(half, generator=gen, device=self.device,
                                                        condition=None if c is None else c[m - half:])])
            x0, cost = self.reference_rollout(x_T, gen)
            with torch.no_grad():
                r = self.reward(x0)
            xs.append(x_T)
            targets.append((r - cost).float())
            cs.append(c)
        gather = self.accelerator.gather  # every process fits the value on all processes' rollouts
        x_T, target = gather(torch.cat(xs)), gather(torch.cat(targets))
        conditions = gather(torch.cat(cs)) if self.condition_dim else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed(cfg.seed, round_index, "value"))
            value = ValueFunction(self.sample_shape, a + b, hidden=cfg.aux_hidden,
                                  cond_dim=self.condition_dim).to(self.device)
        # one process: the rollouts' generator continues (the original stream); several: a shared one
        fit_gen = gen if self.accelerator.num_processes == 1 else round_generator(cfg.seed, round_index, "value_fit")
        value_loss = value.fit(x_T, target, steps=cfg.value_train_steps, lr=cfg.value_learning_rate,
                               generator=fit_gen, progress=False, conditions=conditions)
        value.requires_grad_(False)
        broadcast_tensors(self.accelerator, value.state_dict(keep_vars=True).values())
        metrics = self.fit_initial_noise(value, cfg.noise_train_steps, self._rank_generator(round_index, "noise"),
                                         reference=self.previous_noise, reference_weight=b / (a + b), log_prefix=None,
                                         desc=f"round {round_index}: initial noise")
        return {"noise/value_loss": value_loss, "noise/loss": metrics["noise/loss"],
                "noise/kl_standard": metrics["noise/kl"], "noise/kl_previous": metrics["noise/kl_previous"]}

    def train_drift(self, round_index: int) -> dict:
        """``train_steps`` iterations on ``mean(-(r_hat + g) + alpha KL_pre + beta KL_prev)`` (exact sweep)."""
        cfg = self.config
        params = lora_parameters(self.model, CONTROL_ADAPTER)
        opt, lr_schedule = self.make_optimizer(params)
        gen = self._rank_generator(round_index, "drift")
        bar = self._progress(range(cfg.train_steps), f"round {round_index}: drift", leave=False)
        for it in bar:
            # a logging step: where the KL passes are half precision, the logged KLs are evaluated exactly
            self._exact_kl_due = logging_step = (it + 1) % cfg.log_every == 0 or it == cfg.train_steps - 1
            out = self.drift_iteration(opt, params, gen, reference_kl_weight=cfg.beta)
            lr_schedule.step()
            self.global_step += 1
            r, (kl, kl_prev, exact) = out["reward"].mean().item(), logged_kls(out)
            metrics = {**exact, "train/optimistic_reward": r, "train/kl_pretrained": kl, "train/kl_previous": kl_prev,
                       "train/kl_init": out["kl_init"].mean().item(),
                       "train/objective": r - cfg.alpha * kl - cfg.beta * kl_prev, "train/grad_norm": out["grad_norm"],
                       "train/skipped_steps": self.skipped_steps}
            if logging_step:
                self._log(metrics, step=self.global_step)
                bar.set_postfix(reward=f"{r:.3f}", kl=f"{kl:.3f}")
        return metrics

    def update_model(self, round_index: int) -> dict:
        """Freezes ``p_{i-1}`` (adapter and initial noise) and solves the round's two-KL problem."""
        copy_adapter_weights(self.model, CONTROL_ADAPTER, PREVIOUS_ADAPTER)
        metrics = {}
        if self.initial_noise is not None:
            self.previous_noise.load_state_dict(self.initial_noise.state_dict())
            metrics.update(self.train_initial_noise(round_index))
        metrics.update(self.train_drift(round_index))
        return metrics

    # ------------------------------------------------------------------ loop
    def train(self, callback=None) -> dict:
        """Runs (or resumes) the rounds; returns the last round's metrics. ``callback(trainer, round_index) ->
        dict`` (optional) runs after each round's update, e.g. an evaluation; its metrics are logged with the round's.
        """
        if not self._holds_lock:  # an earlier train() ended: take the lock again and re-read what is on disk now
            self._lock, self._holds_lock = lock_on_main(self.accelerator, self.output_dir), True
            self._open_and_load()
        try:
            return self._train(callback)
        finally:
            self.close()

    def _train(self, callback) -> dict:
        self._start_trackers()
        metrics = {}
        first = self.completed_rounds + 1
        rounds = self._progress(range(first, self.config.num_rounds + 1), "SEIKO rounds",
                                initial=self.completed_rounds, total=self.config.num_rounds)
        for i in rounds:
            t0 = time.perf_counter()
            metrics = {"round": i}
            metrics.update(self.collect_feedback(i))
            metrics.update(self.fit_reward(i))
            metrics.update(self.update_model(i))
            self.completed_rounds = i
            self.save_state()
            metrics["time/round_s"] = time.perf_counter() - t0
            if callback is not None:
                metrics.update(callback(self, i) or {})
            numbers = {f"round_metrics/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self._log(numbers, step=self.global_step)  # the round's last drift step: tracker steps never go back
            rounds.set_postfix(queries=self.num_queries, oracle_mean=f"{metrics['round/oracle_mean']:.3f}")
        self._end_trackers()
        return metrics

    # ------------------------------------------------------------------ export
    def save_pretrained(self, save_directory: str, metrics: dict | None = None, sample_grid=None,
                        base_model: str | None = None, repo_id: str | None = None,
                        card_info: dict | None = None) -> None:
        """The fine-tuned model in the ELEGANT format (adapter, initial-noise model, config, options, model card;
        loadable with ``ElegantTrainer.from_pretrained``) plus ``seiko_config.json``. Main process only."""
        if not self.is_main_process:
            return
        seiko = {**self.config.card_fields(self.oracle.name, self.num_queries), **(card_info or {}).get("seiko", {})}
        save_control(save_directory, self.process, self.config.elegant_config(), self.initial_noise,
                     reward=self.reward_name, metrics=metrics, sample_grid=sample_grid, base_model=base_model,
                     repo_id=repo_id, card_info={**(card_info or {}), "seiko": seiko})
        self.config.save(os.path.join(save_directory, SEIKO_CONFIG_NAME), published=True)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    feedback_repo_id: str | None = None, commit_message: str | None = None,
                    endpoint: str | None = None, metrics: dict | None = None, base_model: str | None = None,
                    save_directory: str | None = None):
        """Uploads :meth:`save_pretrained` output to the model repo ``repo_id`` in one commit (creating it if
        needed); with ``feedback_repo_id`` also the feedback dataset as a dataset repo
        (:meth:`FeedbackDataset.push_to_hub`). Returns the model repo's ``CommitInfo``."""
        message = commit_message or f"SEIKO model after {self.completed_rounds} rounds, {self.num_queries} queries"
        info = super().push_to_hub(repo_id, private, token, message, save_directory, metrics, base_model=base_model,
                                   endpoint=endpoint)
        if feedback_repo_id is not None and self.is_main_process:
            self.feedback.push_to_hub(feedback_repo_id, private=private, token=token, endpoint=endpoint)
        return info
