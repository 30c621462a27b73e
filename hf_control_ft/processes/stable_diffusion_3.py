"""Stable Diffusion 3 / 3.5 as a controlled process: a flow-matching transformer, classifier-free guidance,
pooled text projections (``docs/algorithms.md`` §11).

:class:`StableDiffusion3Process` is the :class:`~hf_control_ft.processes.stable_diffusion.StableDiffusionProcess`
of a diffusers ``StableDiffusion3Pipeline``; it changes what differs in the family and keeps the rest (prompt
sources, mixed precision and the fp32 KL passes, decoding for the reward and the oracle, SEIKO features):

* network: :class:`GuidedTransformer`, the ``SD3Transformer2DModel`` called as the pipeline calls it
  (``hidden_states``, ``timestep = s * 1000``, ``encoder_hidden_states``, ``pooled_projections``) and guided
  ``v_u + w (v_c - v_u)``; the per-step KL compares the *guided* fine-tuned and pretrained velocities;
* schedule: the pipeline's ``FlowMatchEulerDiscreteScheduler`` as exact Gaussian
  transitions (:class:`~hf_control_ft.core.flow_matching.FlowMatchSchedule`, ``eta`` as DDIM's; 1: memoryless);
* conditioning: the pipeline's own ``encode_prompt`` (two CLIP encoders, and T5 when ``text_encoder_3`` is
  loaded; ``text_encoder_3=None`` is supported, as in diffusers, with zero T5 embeddings of
  ``max_sequence_length`` tokens); condition features = the pooled projections;
* LoRA: the attention projections of the joint-attention blocks, image stream (``to_q``, ``to_k``, ``to_v``,
  ``to_out.0``) and text stream (``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``), saved with
  ``StableDiffusion3Pipeline.save_lora_weights`` (``transformer.*`` keys + adapter metadata), so stock
  ``pipe.load_lora_weights(dir_or_repo)`` loads it;
* decoding: ``latents / scaling_factor + shift_factor`` through the VAE.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.flow_matching import is_flow_scheduler
from ..serialization.lora_io import save_lora_file
from .memory import text_encoders
from .sd_components import PooledGuidedNetwork
from .stable_diffusion import StableDiffusionProcess

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class GuidedTransformer(PooledGuidedNetwork):
    """An SD3 transformer as ``model(sample, t) -> v``, conditioned on ``(prompt_embeds, pooled_projections)``,
    called as ``StableDiffusion3Pipeline`` calls it (same guidance and precision rules as :class:`GuidedUNet`,
    whose ``unet`` attribute holds the transformer here)."""

    def __init__(self, transformer: nn.Module, guidance_scale: float, autocast_dtype):
        super().__init__(transformer, guidance_scale, autocast_dtype, _call_sd3_transformer)


def _call_sd3_transformer(transformer, x, t, embeds, pooled) -> torch.Tensor:
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                       return_dict=False)[0]


class StableDiffusion3Process(StableDiffusionProcess):
    """A ``StableDiffusion3Pipeline`` as the controlled process (module docstring). Same arguments as
    :class:`~hf_control_ft.processes.stable_diffusion.StableDiffusionProcess`; ``options.max_sequence_length``
    is the T5 context length (256, as the pipeline's default)."""

    family = "stable-diffusion-3"
    option_defaults = {"guidance_scale": 7.0, "max_sequence_length": 256}  # StableDiffusion3Pipeline's

    @property
    def default_targets(self) -> list[str]:
        """:data:`SD3_TARGETS` present in this transformer (the last joint block has no ``to_add_out``)."""
        names = [n for n, _ in self.pipeline.transformer.named_modules()]
        return [t for t in SD3_TARGETS if any(n == t or n.endswith("." + t) for n in names)]

    #: components the pipeline must have (SD3 and FLUX alike; SD3's ``text_encoder_3`` may be None)
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "scheduler")

    def check_pipeline(self, pipeline):
        """Refuses a pipeline without the family's components or with a scheduler other than flow matching;
        returns the scheduler (:class:`~hf_control_ft.core.flow_matching.FlowMatchSchedule` copies it)."""
        for attr in self.required_components:
            if getattr(pipeline, attr, None) is None:
                raise ValueError(f"{type(pipeline).__name__} has no {attr!r} component; the {self.family} process "
                                 f"needs {list(self.required_components)}")
        return self.flow_scheduler(pipeline)

    def flow_scheduler(self, pipeline):
        """The flow-matching scheduler the sampler copies: the pipeline's own; others are refused."""
        if not is_flow_scheduler(pipeline.scheduler):
            raise ValueError(f"{type(pipeline).__name__} with {type(pipeline.scheduler).__name__}: {self.family} "
                             "samples with the exact flow transitions of a FlowMatchEulerDiscreteScheduler; multistep "
                             "or other solvers are not converted")
        return pipeline.scheduler

    def denoiser_module(self) -> nn.Module:
        return self.pipeline.transformer

    def frozen_modules(self) -> list:
        """The transformer, the VAE and every text encoder the pipeline has loaded (one to three, by family)."""
        return [self.pipeline.transformer, self.pipeline.vae, *text_encoders(self.pipeline)]

    def guided_network(self, denoiser: nn.Module, options) -> nn.Module:
        return GuidedTransformer(denoiser, options.guidance_scale, options.dtype)

    def latent_shape(self, height, width) -> tuple:
        scale = self.pipeline.vae_scale_factor
        default = self.pipeline.transformer.config.sample_size * scale
        height, width = height or default, width or default
        patch = scale * self.pipeline.transformer.config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"height and width must be multiples of {patch} (VAE scale x patch size), got "
                             f"{height}x{width}")
        return (self.pipeline.transformer.config.in_channels, height // scale, width // scale)

    def pooled_dim(self) -> int:
        return int(self.pipeline.transformer.config.pooled_projection_dim)

    @torch.no_grad()
    def encode(self, prompts: list[str], pooled: bool = False):
        """``(prompt_embeds, pooled_projections)`` from the pipeline's ``encode_prompt`` (and, with ``pooled``,
        the pooled projections as fp32 condition features)."""
        embeds, _, pooled_proj, _ = self.pipeline.encode_prompt(
            list(prompts), None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.options.max_sequence_length)
        conditioning = (embeds, pooled_proj)
        return (conditioning, pooled_proj.float()) if pooled else conditioning

    def save_adapter(self, directory: str, adapter_name: str = "control") -> str:
        """``pytorch_lora_weights.safetensors`` written by ``StableDiffusion3Pipeline.save_lora_weights``."""
        return save_lora_file(self.lora_model, self.peft_config(adapter_name), directory, adapter_name,
                              component="transformer", writer=type(self.pipeline))

    def save_options(self, directory: str, base_model: str | None = None) -> dict:
        return {**super().save_options(directory, base_model), "flow": True}


__all__ = ["StableDiffusion3Process", "GuidedTransformer", "SD3_TARGETS"]
