"""The controlled process: the one object that says what is being fine-tuned and how it is sampled.

A :class:`ControlledProcess` holds

* the **network and its adapters**: ``model`` is what the sampler calls as ``model(sample, t, **model_kwargs)``
  (for Stable Diffusion a classifier-free-guidance wrapper around the UNet); ``lora_model`` is the module that
  carries the LoRA layers (the ``"control"`` adapter and, for SEIKO, a frozen ``"previous"`` copy);
* the **schedule as Gaussian transitions** (:class:`~hf_control_ft.core.scheduling.DiffusionSchedule` or, for
  flow matching, :class:`~hf_control_ft.core.flow_matching.FlowMatchSchedule`: means,
  standard deviations, deterministic steps) and the sampler built on it;
* the **per-batch conditioning**: :meth:`draw_conditions` draws one condition per sample (a prompt, or nothing
  for unconditional models), :meth:`set_conditions` conditions the network and the reward on them;
* the **decoding** to what the reward and the oracle see (:meth:`reward_function`, :meth:`oracle_inputs`,
  :meth:`decode`) and the features the SEIKO reward heads use (:meth:`reward_features`);
* the **sample shape**;
* what it **saves and loads**: the adapter in the family's diffusers LoRA format and the family's options.

The trainers (:mod:`hf_control_ft.trainers`) take a process and never look inside the network. This module is
the unconditional implementation (any ``model(sample, t)`` on a DDPM / DDIM scheduler); a new model family is a
subclass in a module of its own (:mod:`hf_control_ft.processes.stable_diffusion`).
"""

from __future__ import annotations

import logging

import torch

from ..core.control import add_lora_control, tuner_layers
from ..core.flow_matching import build_schedule
from ..core.scheduling import check_controllable
from ..core.sampler import ControlledSampler
from ..serialization.lora_io import save_lora_file


logger = logging.getLogger(__name__)

#: a flow chain whose control ends above this noise level leaves the fine detail uncontrolled: a warning says so
CONTROL_END_WARNING = 0.3


def check_schedule(schedule) -> None:
    """Refuses a schedule with no random step (naming ``--num_inference_steps``) and warns when a flow chain's
    control ends above ``s = 0.3`` (3-4 steps: the last 60-75 % of the levels would be left to the pretrained
    network); ``docs/algorithms.md`` §11."""
    check_controllable(schedule)
    end = getattr(schedule, "control_end_level", None)
    if end is not None and end > CONTROL_END_WARNING:
        logger.warning("--num_inference_steps %d: the chain is controlled from noise level 1 down to s = %.3f only; "
                       "below it the pretrained network runs (the steps into the grid's floor and to 0 are "
                       "deterministic) and the adapter is never trained there. More steps move this level down "
                       "(s = 0.278 at 10 steps of SD3's grid).", len(schedule), end)


class ControlledProcess:
    """An unconditional denoiser on a DDPM / DDIM scheduler with a LoRA control.

    Args:
        model: denoiser called as ``model(sample, timestep, **model_kwargs)``; a LoRA adapter named
            ``"control"`` is added unless the model already has one. Its base weights are frozen.
        scheduler: diffusers ``DDPMScheduler`` or ``DDIMScheduler`` (the schedule works on a copy).
        sample_shape: shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
        config: the training config (fields ``num_inference_steps``, ``eta``, ``lora_rank``, ``lora_alpha``,
            ``lora_target_modules``, ``gradient_checkpointing``, ``truncate_backprop_steps``).
        model_kwargs: extra keyword arguments for every denoiser call.
        schedule_options: ``mu`` / ``sigmas`` of a flow-matching scheduler, as its pipeline sets them (FLUX).

    The scheduler may be a ``DDPMScheduler`` / ``DDIMScheduler`` (noise prediction) or a
    ``FlowMatchEulerDiscreteScheduler`` (velocity prediction, :mod:`hf_control_ft.core.flow_matching`).
    """

    #: name of the model family (model cards, logs)
    family = "unconditional"
    #: whether per-step values (``drift_objective="value_guided"``) can be fitted for this process
    supports_step_values = True
    #: width of the per-sample condition features (0: unconditional)
    condition_dim = 0

    def __init__(self, model: torch.nn.Module, scheduler, sample_shape, config, model_kwargs: dict | None = None,
                 schedule_options: dict | None = None):
        self.config = config
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.model = model
        self.lora_model = model
        self.lora_config = None
        if not tuner_layers(model):
            self.lora_config = add_lora_control(model, config.lora_rank, config.lora_target_modules,
                                                config.lora_alpha)
        self.schedule = build_schedule(scheduler, config.num_inference_steps, config.eta, **(schedule_options or {}))
        check_schedule(self.schedule)
        self.model_kwargs = {} if model_kwargs is None else model_kwargs
        self.current_conditions = None

    # ------------------------------------------------------------------ network and sampler
    def to(self, device) -> "ControlledProcess":
        self.model.to(device)
        return self

    def make_sampler(self, reference_adapter: str | None = None) -> ControlledSampler:
        """The controlled sampler of this process (optionally with a frozen reference adapter, SEIKO)."""
        return ControlledSampler(self.model, self.schedule, self.config.gradient_checkpointing,
                                 self.config.truncate_backprop_steps, self.model_kwargs,
                                 reference_adapter=reference_adapter, kl_context=self.kl_context(),
                                 difference=self.kl_difference())

    def kl_context(self):
        """Callable returning the context entered around network calls that feed a KL (``None``: none)."""
        return None

    def kl_difference(self) -> bool:
        """Whether the KL's mean differences come from difference propagation (``kl_precision="delta"``,
        :mod:`hf_control_ft.core.difference`) rather than from subtracting two passes."""
        return False

    def exact_kl_context(self):
        """Callable returning the context of an exact KL evaluation, where the passes that train are not exact
        (half-precision KL passes); ``None`` when they are (the trainer then logs the training passes' KL)."""
        return None

    def peft_config(self, adapter_name: str = "control"):
        """The ``LoraConfig`` of an adapter on :attr:`lora_model`."""
        if adapter_name == "control" and self.lora_config is not None:
            return self.lora_config
        peft_cfg = getattr(self.lora_model, "peft_config", None)
        if isinstance(peft_cfg, dict) and adapter_name in peft_cfg:
            return peft_cfg[adapter_name]
        raise RuntimeError(f"cannot find the LoraConfig of the {adapter_name!r} adapter on the model")

    # ------------------------------------------------------------------ conditioning
    def draw_conditions(self, batch_size: int, generator: torch.Generator | None):
        """One condition per sample of the next batch (``None``: unconditional; draws nothing)."""
        return None

    def set_conditions(self, conditions) -> None:
        """Conditions the network and the reward on ``conditions`` (one per sample)."""
        if conditions is not None:
            raise ValueError(f"{type(self).__name__} is unconditional: it takes no prompts / conditions")
        self.current_conditions = None

    def prepare_batch(self, batch_size: int, generator: torch.Generator | None):
        """Draws and sets the conditions of the next batch; returns them."""
        conditions = self.draw_conditions(batch_size, generator)
        self.set_conditions(conditions)
        return conditions

    def condition_features(self, conditions=None) -> torch.Tensor | None:
        """``(B, condition_dim)`` float32 features of ``conditions`` (default: the current batch's) on which the
        initial noise and the values are conditioned; ``None`` for unconditional processes."""
        return None

    def check_conditions(self, conditions, num_samples: int | None):
        """Validates user-given conditions for :meth:`sample`-style calls; returns ``(conditions, num_samples)``."""
        if conditions is not None:
            raise ValueError(f"{type(self).__name__} is unconditional: prompts cannot be given")
        if num_samples is None:
            raise ValueError("pass num_samples")
        return None, num_samples

    # ------------------------------------------------------------------ what the reward / oracle sees
    def reward_function(self, reward_fn):
        """``x -> (B,)`` for the trainer: the user's reward on what it sees (here: the samples themselves)."""
        return reward_fn

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples -> what a person (and the reward) sees; the identity for unconditional processes."""
        return x

    @torch.no_grad()
    def oracle_inputs(self, samples: torch.Tensor, conditions, chunk_size: int):
        """``(inputs, conditions)`` the oracle is called with for stored samples and their conditions."""
        return samples, None

    def reward_features(self, feature_extractor, feature_dim: int | None, chunk_size: int):
        """``(extractor, dim)`` of the SEIKO reward heads (``(None, None)``: the raw flattened samples)."""
        return feature_extractor, feature_dim

    # ------------------------------------------------------------------ persistence
    def save_adapter(self, directory: str, adapter_name: str = "control") -> str:
        """Writes the adapter in diffusers' LoRA format with its metadata; returns the file path."""
        return save_lora_file(self.lora_model, self.peft_config(adapter_name), directory, adapter_name)

    def save_options(self, directory: str, base_model: str | None = None) -> dict:
        """Writes the family's options (none here); returns the model-card fields they give."""
        return {"base_model": base_model, "conditional": False, "guidance_scale": None}

    def run_settings(self) -> dict:
        """What a resumed run may not change about the process (JSON values): its family and sample shape here;
        text-to-image families add base model, prompts, guidance, size and precision."""
        return {"family": self.family, "sample_shape": list(self.sample_shape)}
