"""Controlled processes: what is fine-tuned (network + adapters, schedule, conditioning, decoding, persistence).

* :class:`ControlledProcess`: any unconditional ``model(sample, t)`` on a DDPM / DDIM scheduler.
* :class:`ClassConditionalProcess`: ``model(sample, t, class_labels=...)`` (class-conditional ``UNet2DModel``).
* :class:`StableDiffusionProcess`: a ``StableDiffusionPipeline`` (SD 1.x / 2.x).
* :class:`StableDiffusionXLProcess`: a ``StableDiffusionXLPipeline`` (two text encoders, added time ids).
* :class:`StableDiffusion3Process`: a ``StableDiffusion3Pipeline`` (SD3 / SD3.5, flow matching).
* :class:`FluxProcess`: a ``FluxPipeline`` (FLUX.1, flow matching, packed latents, guidance embedding).
* :class:`Flux2KleinProcess`: a ``Flux2KleinPipeline`` (FLUX.2 [klein], Qwen3 layers, patchified latents).
* :class:`QwenImageProcess`: a ``QwenImagePipeline`` (Qwen-Image, Qwen2.5-VL captions, true CFG with norm rescaling).
* :class:`WanProcess`: a ``WanPipeline`` (Wan text-to-video: video latents, UMT5 prompts).
* :class:`ZImageProcess`: a ``ZImagePipeline`` (Z-Image, Qwen3 captions, list-input transformer).

:func:`process_from_pipeline` picks the process of a diffusers pipeline. A new model family is one new module
here; the trainers take any process.
"""

import os

from .base import ControlledProcess
from .class_conditional import ClassConditionalProcess
from .flux import FluxProcess
from .flux2 import Flux2KleinProcess
from .sd_components import StableDiffusionOptions
from .qwen_image import QwenImageProcess
from .stable_diffusion import StableDiffusionProcess
from .stable_diffusion_3 import StableDiffusion3Process
from .stable_diffusion_xl import StableDiffusionXLProcess
from .wan import WanProcess
from .z_image import ZImageProcess

#: pipeline class name -> process; anything else is refused with this list
PROCESSES = {"StableDiffusionPipeline": StableDiffusionProcess, "StableDiffusion3Pipeline": StableDiffusion3Process,
             "FluxPipeline": FluxProcess, "StableDiffusionXLPipeline": StableDiffusionXLProcess,
             "ZImagePipeline": ZImageProcess, "QwenImagePipeline": QwenImageProcess,
             "Flux2KleinPipeline": Flux2KleinProcess, "WanPipeline": WanProcess}


def process_from_pipeline(pipeline, config, prompts, **options) -> ControlledProcess:
    """The controlled process of a diffusers pipeline.

    Args:
        pipeline: a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline`` or
            ``FluxPipeline`` (others are
            refused with the list of supported classes; subclasses are matched through their base class).
        config: the training config (LoRA, sampler and seed fields).
        prompts: list of prompts, a text file (one per line) or a ``datasets.Dataset``.
        **options: fields of :class:`StableDiffusionOptions` (``guidance_scale``, ``negative_prompt``,
            ``height``, ``width``, ``mixed_precision``, ``kl_precision``, ``base_model``, ``prompt_column``).
            ``base_model`` defaults to the pipeline's ``name_or_path``; ``mixed_precision`` to the one
            ``accelerate launch --mixed_precision`` set (``ACCELERATE_MIXED_PRECISION``), else ``"no"``.
    """
    if options.get("base_model") is None:
        options["base_model"] = getattr(pipeline, "name_or_path", None) or None
    if options.get("mixed_precision") is None:  # accelerate launch --mixed_precision sets this variable
        options["mixed_precision"] = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    process_class = next((PROCESSES[c.__name__] for c in type(pipeline).__mro__ if c.__name__ in PROCESSES), None)
    if process_class is None:
        raise ValueError(f"{type(pipeline).__name__} is not supported; supported pipelines: {sorted(PROCESSES)}")
    return process_class(pipeline, config, prompts, StableDiffusionOptions(**options))


__all__ = ["ControlledProcess", "ClassConditionalProcess", "StableDiffusionProcess", "StableDiffusion3Process",
           "StableDiffusionXLProcess", "FluxProcess", "ZImageProcess", "QwenImageProcess", "Flux2KleinProcess", "WanProcess",
           "StableDiffusionOptions", "process_from_pipeline", "PROCESSES"]
