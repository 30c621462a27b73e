"""Checkpoints of an ELEGANT run: what :class:`~hf_control_ft.trainers.elegant.ElegantTrainer` writes every
``checkpointing_steps`` drift steps and restores on ``train(resume_from_checkpoint=...)``.

A checkpoint holds the LoRA weights, the initial-noise model once stage 2 is done, the optimiser and LR-schedule
state, the step, the metric history and the config (:mod:`hf_control_ft.serialization.checkpoints` writes it
atomically). A resumed run refuses settings that would change the objective, the model or the optimiser
(:data:`~hf_control_ft.trainers.elegant_config.RESUME_KEYS`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os

import torch
from accelerate.utils import gather_object

from ..core.control import load_lora_state_dict, lora_state_dict
from ..models.initial_noise import InitialNoiseModel
from ..serialization import checkpoints as checkpointing
from ..serialization.saved import INITIAL_NOISE_DIR
from .elegant_config import RESUME_KEYS
from .ema import split_state


#: the flag that sets each process setting a resumed run may not change
SETTING_FLAGS = {"base_model": "--pretrained_model_name_or_path", "prompts_sha256": "--prompts / --prompts_file / "
                 "--dataset_name", "height": "--height / --resolution", "width": "--width / --resolution",
                 "sample_shape": "--height / --width / --resolution / --num_frames", "family": "the base model"}


def check_run_settings(path: str, state: dict, settings: dict, reward: str | None) -> None:
    """Refuses to resume the checkpoint at ``path`` with another base model, reward, prompts, guidance, size or
    precision than it was trained with (``ValueError`` naming the flags and both values). Checkpoints written before
    these were recorded are not checked."""
    changed = []
    saved = state.get("process")
    if isinstance(saved, dict):
        for key in sorted(set(saved) | set(settings)):
            if saved.get(key) != settings.get(key):
                flag = SETTING_FLAGS.get(key, f"--{key}")
                shown = "(changed)" if key == "prompts_sha256" else f"{saved.get(key)!r}, now {settings.get(key)!r}"
                changed.append(f"{flag}: {shown}")
    if state.get("reward") is not None and reward is not None and state["reward"] != reward:
        changed.append(f"--reward: {state['reward']!r}, now {reward!r}")
    if changed:
        raise ValueError(f"{path} was trained on another setting; resuming would train one model on two: "
                         f"{'; '.join(changed)} (the checkpoint's value first). Resume with the run's own flags and "
                         "--config, or start a new run in another --output_dir")


class ElegantCheckpointing:
    """Mixin of :class:`~hf_control_ft.trainers.elegant.ElegantTrainer`: ``save_checkpoint`` / ``load_checkpoint``,
    and the step bookkeeping a resumed run must reproduce (per-step seeds, tracker steps)."""

    def log_step(self, drift_step: int) -> int:
        """The tracker step of drift step ``drift_step`` (see :attr:`drift_log_offset`)."""
        return self.drift_log_offset + int(drift_step)

    @property
    def drift_log_offset(self) -> int:
        """Tracker steps strictly increase across the stages: stage 1 logs at 0, stage 2 at ``1..N``
        (``N = noise_train_steps``), the per-step value fit at ``N + 1`` and drift step ``n`` at ``N + 1 + n``
        (without learned initial noise: ``0`` and ``n``)."""
        return self.config.noise_train_steps + 1 if self.initial_noise is not None else 0

    def _step_seed(self, step: int) -> int:
        """A 63-bit seed hashed from (seed, rank, step): independent of every other stream the trainer uses."""
        key = f"hf_control_ft/drift/{self.config.seed}/{self.accelerator.process_index}/{step}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    def save_checkpoint(self, optimizer=None, lr_schedule=None) -> str | None:
        """Writes ``<output_dir>/checkpoint-<global_step>`` (main process; fsynced, atomic rename; rotation to
        ``checkpoints_total_limit``; never non-finite weights). Returns its path on the main process."""
        cfg = self.config
        self.accelerator.wait_for_everyone()
        rng = None
        if self._step_value_rng is not None:  # every rank's stream of the per-step values
            rng = [base64.b64encode(self._step_value_rng.numpy().tobytes()).decode()]
            rng = gather_object(rng) if self.accelerator.num_processes > 1 else rng
        path = None
        if self.is_main_process:
            state = {"global_step": self.global_step, "initial_noise_trained": self.initial_noise_trained,
                     "history": self.history, "config": cfg.to_dict(), "step_value_rng": rng,
                     "process": self.process.run_settings(), "reward": self.reward_name}
            noise = self.initial_noise if self.initial_noise is not None and self.initial_noise_trained else None
            weights = lora_state_dict(self.model)
            if self.ema is not None:  # --use_ema: the average beside the trained weights
                weights.update(self.ema.state_dict())
            path = checkpointing.write_checkpoint(cfg.output_dir, self.global_step, weights, state,
                                                  optimizer, lr_schedule, noise, cfg.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restores what :meth:`save_checkpoint` wrote; training continues at its ``global_step``.

        Raises ``ValueError`` listing the fields of :data:`RESUME_KEYS` whose values differ from the checkpoint's.
        """
        weights, state, optim = checkpointing.read_checkpoint(path, self.device)
        saved = state.get("config")
        if saved is not None:
            current = self.config.to_dict()
            # a key newer than the checkpoint was trained with its field's default (the value before it existed)
            defaults = {f.name: f.default for f in dataclasses.fields(self.config)
                        if f.default is not dataclasses.MISSING}
            saved = {k: saved.get(k, defaults.get(k)) for k in RESUME_KEYS if k in saved or k in defaults}
            changed = {k: (saved[k], current.get(k)) for k in saved if saved[k] != current.get(k)}
            if changed:
                raise ValueError(f"{path} was trained with other settings; resuming with changed {sorted(changed)} "
                                 f"(saved vs now: {changed}) would change the objective, the model or the optimiser. "
                                 "Resume with the saved values, or start a new run in another output_dir")
        check_run_settings(path, state, self.process.run_settings(), self.reward_name)
        weights, self._ema_state = split_state(weights)
        load_lora_state_dict(self.model, weights)
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
        self.initial_noise_trained = bool(state.get("initial_noise_trained", False))
        rng = state.get("step_value_rng")
        if rng and len(rng) > self.accelerator.process_index:
            raw = base64.b64decode(rng[self.accelerator.process_index])
            self._step_value_rng = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        if self.initial_noise is not None and self.initial_noise_trained:
            noise_dir = os.path.join(path, INITIAL_NOISE_DIR)
            self.initial_noise = InitialNoiseModel.from_pretrained(noise_dir).to(self.device)
            self.initial_noise.requires_grad_(False)
        if optim is not None:
            self._optimizer_state = (optim, state)
