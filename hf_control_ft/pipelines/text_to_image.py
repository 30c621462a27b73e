"""Inference with a trained control on any supported family (SD 1.x / 2.x, SDXL, SD3, FLUX.1, Qwen-Image, FLUX.2
[klein], Z-Image; Wan text-to-video, whose samples are videos ``(B, F, 3, H, W)``).

:class:`ControlledTextToImage` wraps a base diffusers pipeline and a saved control (a directory or a Hub repo):

* ``sampler="sde"`` (default): the distribution the control was trained for -- the learned initial noise (per
  prompt when conditional) and the trained stochastic sampler (DDPM / DDIM at ``eta`` or the exact flow transitions,
  ``num_inference_steps`` of training), through the family's process;
* ``sampler="ode"``: the family's own pipeline call with the LoRA active (its scheduler, deterministic for
  DDIM at ``eta = 0`` or flow matching, ``N(0, I)`` start noise) -- what stock diffusers does after
  ``pipe.load_lora_weights`` -- except that the LoRA is switched off below the last level the control was trained
  on (:class:`~hf_control_ft.pipelines.callbacks.ControlCutoff`; a flow chain's last steps are deterministic and run
  the pretrained network, ``docs/algorithms.md`` §11).

    pipe = ControlledTextToImage.from_control("me/elegant-sd3", base_model="stabilityai/stable-diffusion-3.5-medium")
    images = pipe(["a photo of a cat"], generator=torch.Generator().manual_seed(0)).images
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..core.control import pretrained_mode
from ..processes.loading import load_base_pipeline
from ..processes.options import load_dtype
from ..processes.stable_diffusion import load_options
from ..serialization.saved import resolve_directory
from ..trainers.elegant import ElegantTrainer
from .callbacks import ControlCutoff
from .controlled import OUTPUT_TYPES, _format_images

SAMPLERS = ("sde", "ode")


@dataclass
class ControlledOutput:
    """``images``: PIL list, ``np`` array, ``(B, 3, H, W)`` tensor in ``[0, 1]``, or latents (videos: a list of PIL
    frames per video, ``(B, F, H, W, 3)`` array, ``(B, F, 3, H, W)`` tensor)."""

    images: object


class ControlledTextToImage:
    """A base text-to-image pipeline with a trained control (module docstring).

    Args:
        pipeline: the base diffusers pipeline (any family of :func:`hf_control_ft.processes.process_from_pipeline`).
        trainer: an :class:`~hf_control_ft.ElegantTrainer` built on ``pipeline`` with the control loaded
            (:meth:`from_control` makes both).
    """

    def __init__(self, pipeline, trainer: ElegantTrainer):
        self.pipeline = pipeline
        self.trainer = trainer

    @classmethod
    def from_control(cls, control: str, base_model: str | None = None, pipeline=None, token: str | None = None,
                     revision: str | None = None, endpoint: str | None = None, cache_dir: str | None = None,
                     **pipeline_kwargs):
        """Loads the control (directory or Hub repo) and its base pipeline: ``pipeline`` if given, else
        ``base_model``, else the base model the save records."""
        directory = resolve_directory(control, token=token, revision=revision, endpoint=endpoint, cache_dir=cache_dir)
        if pipeline is None:
            options = load_options(directory)
            base = base_model or options.base_model
            if not base:
                raise ValueError(f"{control} records no base model; pass base_model= or pipeline=")
            dtype = load_dtype(options.kl_precision, options.mixed_precision)  # what the process keeps: no fp32 peak
            if dtype is not None:
                pipeline_kwargs.setdefault("torch_dtype", dtype)
            pipeline = load_base_pipeline(base, token=token, **pipeline_kwargs)
        trainer = ElegantTrainer.from_pretrained(directory, pipeline=pipeline, report_to=None)
        return cls(pipeline, trainer)

    @property
    def options(self):
        return self.trainer.process.options

    @torch.no_grad()
    def __call__(self, prompt, num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                 sampler: str = "sde", output_type: str = "pil", controlled: bool = True,
                 batch_size: int | None = None) -> ControlledOutput:
        """Images for ``prompt`` (a string or a list), ``num_images_per_prompt`` each.

        ``controlled=False`` samples the base model (``sampler="sde"``: the same stochastic sampler from
        ``N(0, I)`` with the adapter off; ``"ode"``: the stock pipeline with the adapter off).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if sampler == "sde":
            latents = self.trainer.sample(prompts=prompts, generator=generator, controlled=controlled,
                                          batch_size=batch_size)
            if output_type == "latent":
                return ControlledOutput(latents)
            return ControlledOutput(_format(self.trainer.decode(latents).float().cpu(), output_type))
        return ControlledOutput(self._ode(prompts, generator, output_type, controlled))

    def _ode(self, prompts, generator, output_type: str, controlled: bool):
        """The family's own pipeline call (its scheduler and start noise) with the LoRA on (down to the last trained
        level) or off."""
        kwargs = self.trainer.process.pipeline_kwargs(len(prompts), self.trainer.config.num_inference_steps)
        kwargs.update(generator=generator, output_type="pt" if output_type != "latent" else "latent")
        context = pretrained_mode(self.trainer.process.lora_model) if not controlled else contextlib.nullcontext()
        cutoff = ControlCutoff(self.trainer.schedule.control_end_timestep)
        if controlled and cutoff.end_timestep is not None:
            kwargs["callback_on_step_end"] = cutoff  # the adapter only where it was trained
        try:
            with context:
                out = self.pipeline(prompt=prompts, **kwargs)
        finally:
            cutoff.restore()
        images = out.frames if hasattr(out, "frames") else out.images  # video pipelines return frames
        if output_type == "latent":
            return images
        return _format(images.float().cpu(), output_type)


def _format(samples: torch.Tensor, output_type: str):
    """Images ``(B, 3, H, W)`` as :func:`_format_images` gives them; videos ``(B, F, 3, H, W)`` as the tensor, a
    ``(B, F, H, W, 3)`` array, or a list of ``F`` PIL frames per video (as diffusers' video pipelines)."""
    if samples.dim() != 5:
        return _format_images(samples, output_type)
    if output_type == "pt":
        return samples
    if output_type == "np":
        return samples.permute(0, 1, 3, 4, 2).numpy()
    return [_format_images(video, "pil") for video in samples]


__all__ = ["ControlledTextToImage", "ControlledOutput", "SAMPLERS"]
