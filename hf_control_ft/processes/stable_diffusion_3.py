"""Stable Diffusion 3 / 3.5 as a controlled process: a flow-matching transformer, classifier-free guidance,
pooled text projections (``docs/algorithms.md`` §11).

:class:`StableDiffusion3Process` is the :class:`~hf_control_ft.processes.stable_diffusion.StableDiffusionProcess`
of a diffusers ``StableDiffusion3Pipeline``; it changes what differs in the family and keeps the rest (prompt
sources, mixed precision and the fp32 KL passes, decoding for the reward and the oracle, SEIKO features):

* network: :class:`GuidedTransformer`, the ``SD3Transformer2DModel`` called as the pipeline calls it
  (``hidden_states``, ``timestep = s * 1000``, ``encoder_hidden_states``, ``pooled_projections``) and guided
  ``v_u + w (v_c - v_u)``; the per-step KL compares the *guided* fine-tuned and pretrained velocities;
* schedule: the pipeline's ``FlowMatchEulerDiscreteScheduler`` as the exact flow SDE
  (:class:`~hf_control_ft.core.flow_matching.FlowMatchSchedule`, ``eta`` a fraction of the memoryless level);
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
from .sd_components import GuidedUNet, _autocast
from .stable_diffusion import StableDiffusionProcess

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class GuidedTransformer(GuidedUNet):
    """An SD3 transformer as ``model(sample, t) -> v``, conditioned on ``(prompt_embeds, pooled_projections)``.

    Same guidance, precision and ``full_precision`` rules as :class:`GuidedUNet` (whose ``unet`` attribute holds
    the transformer here). Output: fp32 ``(B, C, h, w)`` velocity.
    """

    def set_condition(self, conditioning, negative=None) -> None:
        """``conditioning`` = ``(prompt_embeds (B, L, D), pooled (B, P))``; ``negative`` the same for the
        negative prompt (batch 1 or B), required when guiding."""
        if self.do_guidance and negative is None:
            raise ValueError("guidance_scale > 1 needs negative (unconditional) prompt embeddings")
        embeds, pooled = conditioning
        self.prompt_embeds, self.pooled = embeds.detach(), pooled.detach()
        self.negative_embeds = None if negative is None else tuple(t.detach() for t in negative)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.prompt_embeds is None:
            raise RuntimeError("GuidedTransformer: no prompt embeddings set; call set_condition first")
        B = sample.shape[0]
        if self.prompt_embeds.shape[0] != B:
            raise ValueError(f"GuidedTransformer: {self.prompt_embeds.shape[0]} prompt embeddings for {B} samples")
        autocast_dtype = None if self._full_precision else self.autocast_dtype
        dtype = self.unet.dtype if autocast_dtype is None else autocast_dtype
        embeds, pooled = self.prompt_embeds, self.pooled
        x, t = sample, timestep
        if self.do_guidance:
            neg, neg_pooled = self.negative_embeds
            embeds = torch.cat([neg.expand(B, *neg.shape[1:]), embeds])
            pooled = torch.cat([neg_pooled.expand(B, *neg_pooled.shape[1:]), pooled])
            x, t = torch.cat([sample, sample]), torch.cat([timestep, timestep])
        with _autocast(sample.device, autocast_dtype):
            v = self.unet(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=embeds.to(dtype),
                          pooled_projections=pooled.to(dtype), return_dict=False)[0].float()
        if self.do_guidance:
            v_u, v_c = v.chunk(2)
            return v_u + self.guidance_scale * (v_c - v_u)
        return v


class StableDiffusion3Process(StableDiffusionProcess):
    """A ``StableDiffusion3Pipeline`` as the controlled process (module docstring). Same arguments as
    :class:`~hf_control_ft.processes.stable_diffusion.StableDiffusionProcess`; ``options.max_sequence_length``
    is the T5 context length (256, as the pipeline's default)."""

    family = "stable-diffusion-3"

    @property
    def default_targets(self) -> list[str]:
        """:data:`SD3_TARGETS` present in this transformer (the last joint block has no ``to_add_out``)."""
        names = [n for n, _ in self.pipeline.transformer.named_modules()]
        return [t for t in SD3_TARGETS if any(n == t or n.endswith("." + t) for n in names)]

    def check_pipeline(self, pipeline):
        name = type(pipeline).__name__
        supported = "StableDiffusion3Pipeline (SD3 / SD3.5)"
        for attr in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
            if getattr(pipeline, attr, None) is None:
                raise ValueError(f"{name} has no {attr!r} component; supported here: {supported}")
        if not is_flow_scheduler(pipeline.scheduler):
            raise ValueError(f"{name} with {type(pipeline.scheduler).__name__}: SD3 is trained with the flow SDE of a "
                             "FlowMatchEulerDiscreteScheduler; multistep or other solvers are not converted")
        return pipeline.scheduler  # FlowMatchSchedule works on its own copy

    def denoiser_module(self) -> nn.Module:
        return self.pipeline.transformer

    def frozen_modules(self) -> list:
        p = self.pipeline
        return [m for m in (p.transformer, p.vae, p.text_encoder, p.text_encoder_2, p.text_encoder_3)
                if m is not None]

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
