"""FLUX.1 as a controlled process: a flow-matching transformer on packed latents with a guidance embedding
(``docs/algorithms.md`` §11).

:class:`FluxProcess` is the process of a diffusers ``FluxPipeline``. What differs from SD3
(:mod:`hf_control_ft.processes.stable_diffusion_3`, whose prompt handling, precision, decoding, LoRA format and
cards it keeps):

* **latents**: the sampler's state is the unpacked latent ``(C, h, w)`` (so the initial noise, the values and
  the per-step KL see one tensor per sample); :class:`GuidedFluxTransformer` packs it into ``2x2`` patches
  ``(h/2 * w/2, 4C)`` for the transformer and unpacks the velocity, with the image position ids of the
  pipeline (``_prepare_latent_image_ids``) and the text ids of ``encode_prompt``. Packing is a permutation, so
  the KL summed over dimensions is the same on either side;
* **guidance**: FLUX.1-dev is guidance-distilled: ``guidance_scale`` goes to the transformer's guidance
  embedding, and there is no classifier-free guidance (one network call per step; the negative prompt is not
  used);
* **schedule**: the pipeline's noise levels ``linspace(1, 1/K, K)``, shifted with the image sequence length
  (``mu = calculate_shift(h/2 * w/2, ...)`` when the scheduler uses dynamic shifting), as the exact flow transitions;
* **conditioning**: ``encode_prompt`` (CLIP pooled projection + T5 sequence of ``max_sequence_length``
  tokens); condition features = the pooled CLIP projection;
* **LoRA**: attention projections of the double-stream blocks (``to_q``, ``to_k``, ``to_v``, ``to_out.0``,
  ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``) and of the single-stream blocks, saved with
  ``FluxPipeline.save_lora_weights``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .sd_components import GuidedUNet, _autocast
from .stable_diffusion_3 import StableDiffusion3Process


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``: FLUX's ``2x2`` patches (``FluxPipeline._pack_latents``)."""
    B, C, h, w = latents.shape
    x = latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``(B, h/2 * w/2, 4C)`` -> ``(B, C, h, w)``."""
    B, _, D = tokens.shape
    x = tokens.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """``(h/2 * w/2, 3)`` position ids of the packed patches (row, column), as the pipeline builds them."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def packed_image_size(pipeline, height: int | None, width: int | None, default: int | None = None) -> tuple:
    """``(height, width)`` in pixels, unset ones taking ``default`` (else the pipeline's ``default_sample_size`` x VAE
    scale); refused unless multiples of ``2 x`` the VAE scale, which the families packing 2x2 latent patches need."""
    scale = pipeline.vae_scale_factor
    default = default or pipeline.default_sample_size * scale
    height, width = height or default, width or default
    if height % (2 * scale) or width % (2 * scale):
        raise ValueError(f"height and width must be multiples of {2 * scale} (VAE scale x 2x2 patches), got "
                         f"{height}x{width}")
    return height, width


def shifted_sigmas(config, seq_len: int, num_inference_steps: int) -> dict:
    """The noise levels FLUX-style pipelines (FLUX.1, Qwen-Image, Z-Image) give their scheduler:
    ``sigmas = linspace(1, 1/K, K)`` and, when the scheduler shifts dynamically, ``mu`` of the image sequence
    length ``seq_len`` (the pipelines' ``calculate_shift``: linear from ``base_shift`` at ``base_image_seq_len`` to
    ``max_shift`` at ``max_image_seq_len``)."""
    options = {"sigmas": np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()}
    if config.get("use_dynamic_shifting"):
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (hi - lo) / (top - base)
        options["mu"] = seq_len * slope + lo - slope * base
    return options


class GuidedFluxTransformer(GuidedUNet):
    """A FLUX transformer as ``model(sample (B, C, h, w), t) -> v (B, C, h, w)`` (module docstring).

    ``guidance_scale`` is the guidance-embedding value (ignored by transformers without ``guidance_embeds``);
    there is no classifier-free guidance, so :attr:`do_guidance` is False.
    """

    @property
    def do_guidance(self) -> bool:
        return False

    def set_condition(self, conditioning, negative=None) -> None:
        """``conditioning`` = ``(prompt_embeds (B, L, D), pooled (B, P), text_ids (L, 3))``."""
        embeds, pooled, text_ids = conditioning
        self.prompt_embeds, self.pooled, self.text_ids = embeds.detach(), pooled.detach(), text_ids.detach()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        B, _, h, w = sample.shape
        autocast_dtype, dtype = self._precision(sample)
        guidance = None
        if self.unet.config.guidance_embeds:
            guidance = torch.full((B,), self.guidance_scale, device=sample.device, dtype=torch.float32)
        with _autocast(sample.device, autocast_dtype):
            v = self.unet(hidden_states=pack_latents(sample).to(dtype), timestep=timestep / 1000, guidance=guidance,
                          pooled_projections=self.pooled.to(dtype), encoder_hidden_states=self.prompt_embeds.to(dtype),
                          txt_ids=self.text_ids, img_ids=latent_image_ids(h, w, sample.device, dtype),
                          return_dict=False)[0]
        return unpack_latents(v.float(), h, w)


class FluxProcess(StableDiffusion3Process):
    """A ``FluxPipeline`` as the controlled process (module docstring); ``options.max_sequence_length`` is the T5
    context length (default 512, the pipeline's and FLUX.1-dev's; FLUX.1-schnell takes 256), ``guidance_scale`` the
    guidance embedding (default 3.5, the pipeline's). A negative prompt is refused: FLUX.1 ignores it."""

    family = "flux"
    option_defaults = {"guidance_scale": 3.5, "max_sequence_length": 512}  # FluxPipeline's (FLUX.1-dev)
    uses_negative_prompt = False  # guidance-distilled: no classifier-free guidance

    def guided_network(self, denoiser: nn.Module, options) -> nn.Module:
        return GuidedFluxTransformer(denoiser, options.guidance_scale, options.dtype)

    def latent_shape(self, height, width) -> tuple:
        height, width = packed_image_size(self.pipeline, height, width)
        scale = self.pipeline.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels // 4, height // scale, width // scale)

    def schedule_options(self, shape, num_inference_steps: int) -> dict:
        return shifted_sigmas(self.pipeline.scheduler.config, (shape[1] // 2) * (shape[2] // 2), num_inference_steps)

    @torch.no_grad()
    def encode(self, prompts: list[str], pooled: bool = False):
        """``(prompt_embeds, pooled_projections, text_ids)`` from ``encode_prompt`` (and the pooled projections as
        fp32 condition features)."""
        embeds, pooled_proj, text_ids = self.pipeline.encode_prompt(
            list(prompts), None, device=self.device, max_sequence_length=self.options.max_sequence_length)
        conditioning = (embeds, pooled_proj, text_ids)
        return (conditioning, pooled_proj.float()) if pooled else conditioning

    batched_conditioning = (True, True, False)  # text_ids: one (L, 3) tensor for any batch

    def save_options(self, directory: str, base_model: str | None = None) -> dict:
        fields = super().save_options(directory, base_model)
        if not self.uses_negative_prompt:
            fields["negative_prompt"] = None  # not used by the family
        return fields


__all__ = ["FluxProcess", "GuidedFluxTransformer", "pack_latents", "unpack_latents", "latent_image_ids",
           "packed_image_size", "shifted_sigmas"]
