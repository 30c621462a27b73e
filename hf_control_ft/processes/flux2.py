"""FLUX.2 [klein] as a controlled process: a flow transformer on patchified, batch-normalised latents, conditioned on
the hidden states of several Qwen3 layers (``docs/algorithms.md`` §11).

:class:`Flux2KleinProcess` is the process of a diffusers ``Flux2KleinPipeline``. What differs from FLUX.1
(:mod:`hf_control_ft.processes.flux`):

* **latents**: the sampler's state is the pipeline's own ``(4C, h/2, w/2)`` patchified latent (its start noise is
  drawn there); the transformer sees it as ``h/2 * w/2`` tokens of ``4C`` channels with 4-D position ids
  ``(t, h, w, l)``; decoding undoes the VAE's batch normalisation (``x * sqrt(running_var + eps) + running_mean``),
  unpatchifies and decodes;
* **guidance**: true classifier-free guidance with the empty prompt, ``v_u + w (v_c - v_u)``, when
  ``guidance_scale > 1`` and the checkpoint is not distilled (klein base: 4.0, 50 steps); the distilled klein
  checkpoints run without it. The pipeline takes no negative prompt, so one is refused;
* **conditioning**: the pipeline's ``encode_prompt`` (chat template, the hidden states of layers 9, 18 and 27 side by
  side, ``max_sequence_length`` tokens with padding, as the transformer sees them) and text ids; condition features =
  the mean of the prompt embedding over its tokens;
* **schedule**: ``linspace(1, 1/K, K)`` shifted by the pipeline's empirical ``mu`` of the sequence length and the
  step count, as the exact flow transitions;
* **LoRA**: attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``add_q_proj``, ``add_k_proj``, ``add_v_proj``,
  ``to_add_out``, the single blocks' fused ``to_qkv_mlp_proj``) and the double blocks' MLPs (``ff`` /
  ``ff_context`` ``linear_in``, ``linear_out``), saved with ``Flux2KleinPipeline.save_lora_weights``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .flux import FluxProcess, packed_image_size
from .sd_components import GuidedUNet, _autocast

FLUX2_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                 "to_qkv_mlp_proj", "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]


def empirical_mu(seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift ``mu`` of an image sequence length and step count (the pipeline's ``compute_empirical_mu``):
    linear in the sequence length, interpolated between its 10- and 200-step fits (above 4300 tokens: the 200-step
    fit)."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    m_200 = a2 * seq_len + b2
    if seq_len > 4300:
        return float(m_200)
    m_10 = a1 * seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + m_200 - 200.0 * slope)


def position_ids(length: int, axis: int, batch: int, device) -> torch.Tensor:
    """``(batch, length, 4)`` ids ``(t, h, w, l)`` that count along ``axis`` (3: text tokens) -- see
    :func:`image_ids` for the image grid."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, axis] = torch.arange(length, device=device)
    return ids.expand(batch, -1, -1)


def image_ids(h: int, w: int, batch: int, device) -> torch.Tensor:
    """``(batch, h * w, 4)`` ids ``(0, row, column, 0)`` of the packed latent grid (``_prepare_latent_ids``)."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)
    return ids.expand(batch, -1, -1)


class GuidedFlux2Transformer(GuidedUNet):
    """A FLUX.2 transformer as ``model(sample (B, 4C, h, w), t = 1000 s) -> v (B, 4C, h, w)`` fp32 (module
    docstring); guided when ``guidance_scale > 1`` unless ``distilled``."""

    def __init__(self, transformer: nn.Module, guidance_scale: float, autocast_dtype, distilled: bool):
        super().__init__(transformer, guidance_scale, autocast_dtype)
        self.distilled = distilled

    @property
    def do_guidance(self) -> bool:
        return self.guidance_scale > 1 and not self.distilled

    def set_condition(self, conditioning, negative=None) -> None:
        """``conditioning`` = ``prompt_embeds (B, L, D)``; ``negative``: the empty prompt's ``(1, L, D)``."""
        if self.do_guidance and negative is None:
            raise ValueError("guidance_scale > 1 needs the empty prompt's embeddings")
        self.prompt_embeds = conditioning.detach()
        self.negative_embeds = None if negative is None else negative.detach()

    def _velocity(self, tokens, t, embeds, h, w, dtype):
        B = tokens.shape[0]
        embeds = embeds.expand(B, *embeds.shape[1:]).to(dtype)
        return self.unet(hidden_states=tokens, encoder_hidden_states=embeds, timestep=t / 1000,
                         img_ids=image_ids(h, w, B, tokens.device),
                         txt_ids=position_ids(embeds.shape[1], 3, B, tokens.device), return_dict=False)[0].float()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        B, C, h, w = sample.shape
        autocast_dtype, dtype = self._precision(sample)
        tokens = sample.reshape(B, C, h * w).transpose(1, 2).to(dtype)  # the pipeline's _pack_latents
        with _autocast(sample.device, autocast_dtype):
            v = self._velocity(tokens, timestep, self.prompt_embeds, h, w, dtype)
            if self.do_guidance:
                v_u = self._velocity(tokens, timestep, self.negative_embeds, h, w, dtype)
                v = v_u + self.guidance_scale * (v - v_u)
        return v.transpose(1, 2).reshape(B, C, h, w)


class Flux2KleinProcess(FluxProcess):
    """A ``Flux2KleinPipeline`` as the controlled process (module docstring); ``options.guidance_scale`` default 4.0
    (the pipeline's; ignored by distilled checkpoints), ``max_sequence_length`` 512."""

    family = "flux2-klein"
    option_defaults = {"guidance_scale": 4.0, "max_sequence_length": 512}  # Flux2KleinPipeline's
    uses_negative_prompt = False  # the pipeline always guides with the empty prompt
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    default_targets = FLUX2_TARGETS

    def guided_network(self, denoiser: nn.Module, options) -> nn.Module:
        distilled = bool(self.pipeline.config.get("is_distilled", False))
        return GuidedFlux2Transformer(denoiser, options.guidance_scale, options.dtype, distilled)

    def latent_shape(self, height, width) -> tuple:
        height, width = packed_image_size(self.pipeline, height, width)
        scale = self.pipeline.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels, height // (2 * scale), width // (2 * scale))

    def schedule_options(self, shape, num_inference_steps: int) -> dict:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()
        options = {} if self.pipeline.scheduler.config.get("use_flow_sigmas") else {"sigmas": sigmas}
        if self.pipeline.scheduler.config.get("use_dynamic_shifting"):
            options["mu"] = empirical_mu(shape[1] * shape[2], num_inference_steps)
        return options

    def pooled_dim(self) -> int:
        return int(self.pipeline.transformer.config.joint_attention_dim)

    @torch.no_grad()
    def encode(self, prompts: list[str], pooled: bool = False):
        """``prompt_embeds (B, L, D)`` from the pipeline's ``encode_prompt`` (and their mean over tokens)."""
        embeds, _ = self.pipeline.encode_prompt(list(prompts), device=self.device,
                                                max_sequence_length=self.options.max_sequence_length)
        return (embeds, embeds.float().mean(1)) if pooled else embeds

    batched_conditioning = None

    def negative_embeds(self):
        if self._negative_embeds is None:
            self._negative_embeds = self.encode([""])
        return self._negative_embeds

    def pipeline_kwargs(self, num_prompts: int, num_inference_steps: int) -> dict:
        kwargs = super().pipeline_kwargs(num_prompts, num_inference_steps)
        kwargs.pop("negative_prompt", None)  # the pipeline guides with the empty prompt by itself
        return kwargs

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Patchified latents ``(B, 4C, h, w)`` -> images ``(B, 3, 16h, 16w)`` in ``[0, 1]`` (differentiable)."""
        vae, autocast_dtype = self.pipeline.vae, self.options.dtype
        dtype = vae.dtype if autocast_dtype is None else autocast_dtype
        bn = vae.bn
        std = torch.sqrt(bn.running_var.float() + vae.config.batch_norm_eps).view(1, -1, 1, 1)
        x = latents * std.to(latents.device) + bn.running_mean.float().view(1, -1, 1, 1).to(latents.device)
        B, C4, h, w = x.shape
        x = x.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * h, 2 * w)
        with _autocast(latents.device, autocast_dtype):
            images = vae.decode(x.to(dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


__all__ = ["Flux2KleinProcess", "GuidedFlux2Transformer", "FLUX2_TARGETS", "empirical_mu"]
