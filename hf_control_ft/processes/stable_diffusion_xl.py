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
from .sd_components import PooledGuidedNetwork
from .stable_diffusion import StableDiffusionProcess


class GuidedXLUNet(PooledGuidedNetwork):
    """An SDXL UNet as ``model(sample, t) -> eps``, conditioned on ``(prompt_embeds, pooled)`` with fixed
    ``time_ids`` ``(1, 6)``; same guidance and precision rules as :class:`GuidedUNet`."""

    def __init__(self, unet: nn.Module, guidance_scale: float, autocast_dtype, time_ids: torch.Tensor):
        super().__init__(unet, guidance_scale, autocast_dtype, self._call_unet)
        self.time_ids = time_ids

    def _call_unet(self, unet, x, t, embeds, pooled) -> torch.Tensor:
        time_ids = self.time_ids.to(x.device, x.dtype).expand(x.shape[0], -1)
        return unet(x, t, encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


class StableDiffusionXLProcess(StableDiffusionProcess):
    """A ``StableDiffusionXLPipeline`` as the controlled process (module docstring)."""

    family = "stable-diffusion-xl"
    option_defaults = {"guidance_scale": 5.0}  # StableDiffusionXLPipeline's

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
