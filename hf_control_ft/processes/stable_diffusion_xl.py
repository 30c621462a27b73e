"""Stable Diffusion XL as a controlled process: two text encoders, pooled embeddings and added time ids.

:class:`StableDiffusionXLProcess` is the process of a diffusers ``StableDiffusionXLPipeline``. It keeps the SD
process's sampler (DDPM / DDIM transitions; SDXL's ``EulerDiscreteScheduler`` becomes, for the sampler only, a
DDIM scheduler with the same noise schedule), precision rules, decoding and cards, and changes:

* conditioning: the pipeline's own ``encode_prompt`` (penultimate hidden states of both CLIP encoders,
  concatenated; the pooled projection of the second) and, for the negative branch of classifier-free guidance,
  its negative embeddings (zeros for an empty negative prompt when ``force_zeros_for_empty_prompt``, as the
  pipeline does); condition features = the pooled projection;
* network: :class:`GuidedXLUNet`, the UNet called with ``added_cond_kwargs = {"text_embeds": pooled,
  "time_ids": (H, W, 0, 0, H, W)}`` (original size = target size = the training resolution, no crop), as the
  pipeline calls it by default;
* LoRA: the UNet's attention projections, saved with ``StableDiffusionXLPipeline.save_lora_weights``
  (``unet.*`` keys + metadata), so stock ``pipe.load_lora_weights`` loads it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.scheduling import as_stochastic_scheduler
from ..serialization.lora_io import save_lora_file
from .sd_components import GuidedUNet, _autocast
from .stable_diffusion import StableDiffusionProcess


class GuidedXLUNet(GuidedUNet):
    """An SDXL UNet as ``model(sample, t) -> eps``, conditioned on ``(prompt_embeds, pooled)`` with fixed
    ``time_ids`` ``(1, 6)``; same guidance and precision rules as :class:`GuidedUNet`."""

    def __init__(self, unet: nn.Module, guidance_scale: float, autocast_dtype, time_ids: torch.Tensor):
        super().__init__(unet, guidance_scale, autocast_dtype)
        self.time_ids = time_ids

    def set_condition(self, conditioning, negative=None) -> None:
        if self.do_guidance and negative is None:
            raise ValueError("guidance_scale > 1 needs negative (unconditional) prompt embeddings")
        embeds, pooled = conditioning
        self.prompt_embeds, self.pooled = embeds.detach(), pooled.detach()
        self.negative_embeds = None if negative is None else tuple(t.detach() for t in negative)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.prompt_embeds is None:
            raise RuntimeError("GuidedXLUNet: no prompt embeddings set; call set_condition first")
        B = sample.shape[0]
        if self.prompt_embeds.shape[0] != B:
            raise ValueError(f"GuidedXLUNet: {self.prompt_embeds.shape[0]} prompt embeddings for {B} samples")
        autocast_dtype = None if self._full_precision else self.autocast_dtype
        dtype = self.unet.dtype if autocast_dtype is None else autocast_dtype
        embeds, pooled, x, t = self.prompt_embeds, self.pooled, sample, timestep
        if self.do_guidance:
            neg, neg_pooled = self.negative_embeds
            embeds = torch.cat([neg.expand(B, *neg.shape[1:]), embeds])
            pooled = torch.cat([neg_pooled.expand(B, *neg_pooled.shape[1:]), pooled])
            x, t = torch.cat([sample, sample]), torch.cat([timestep, timestep])
        time_ids = self.time_ids.to(sample.device, dtype).expand(x.shape[0], -1)
        with _autocast(sample.device, autocast_dtype):
            eps = self.unet(x.to(dtype), t, encoder_hidden_states=embeds.to(dtype),
                            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids}).sample.float()
        if self.do_guidance:
            eps_u, eps_c = eps.chunk(2)
            return eps_u + self.guidance_scale * (eps_c - eps_u)
        return eps


class StableDiffusionXLProcess(StableDiffusionProcess):
    """A ``StableDiffusionXLPipeline`` as the controlled process (module docstring)."""

    family = "stable-diffusion-xl"

    def check_pipeline(self, pipeline):
        name = type(pipeline).__name__
        for attr in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
            if getattr(pipeline, attr, None) is None:
                raise ValueError(f"{name} has no {attr!r} component; supported here: StableDiffusionXLPipeline")
        if getattr(pipeline.unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError(f"{name}: the UNet has no 'text_time' added conditioning; not an SDXL base UNet")
        return as_stochastic_scheduler(pipeline.scheduler)

    def frozen_modules(self) -> list:
        p = self.pipeline
        return [p.unet, p.vae, p.text_encoder, p.text_encoder_2]

    def guided_network(self, denoiser: nn.Module, options) -> nn.Module:
        _, h, w = self.latent_shape(options.height, options.width)
        scale = self.pipeline.vae_scale_factor
        size = (h * scale, w * scale)
        time_ids = self.pipeline._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                                   text_encoder_projection_dim=self.pooled_dim())
        return GuidedXLUNet(denoiser, options.guidance_scale, options.dtype, time_ids)

    def pooled_dim(self) -> int:
        return int(self.pipeline.text_encoder_2.config.projection_dim)

    @torch.no_grad()
    def encode(self, prompts: list[str], pooled: bool = False):
        """``(prompt_embeds, pooled)`` from the pipeline's ``encode_prompt`` (and the pooled embedding as fp32
        condition features)."""
        embeds, _, pooled_embeds, _ = self.pipeline.encode_prompt(list(prompts), device=self.device,
                                                                  do_classifier_free_guidance=False)
        conditioning = (embeds, pooled_embeds)
        return (conditioning, pooled_embeds.float()) if pooled else conditioning

    @torch.no_grad()
    def negative_embeds(self):
        """The negative branch as the pipeline builds it (zeros for an empty prompt when configured so)."""
        if self._negative_embeds is None:
            _, neg, _, neg_pooled = self.pipeline.encode_prompt(
                [""], device=self.device, do_classifier_free_guidance=True,
                negative_prompt=[self.options.negative_prompt])
            self._negative_embeds = (neg, neg_pooled)
        return self._negative_embeds

    def save_adapter(self, directory: str, adapter_name: str = "control") -> str:
        """``pytorch_lora_weights.safetensors`` written by ``StableDiffusionXLPipeline.save_lora_weights``."""
        return save_lora_file(self.lora_model, self.peft_config(adapter_name), directory, adapter_name,
                              component="unet", writer=type(self.pipeline))


__all__ = ["StableDiffusionXLProcess", "GuidedXLUNet"]
