"""Z-Image as a controlled process: a single-stream flow transformer conditioned on a chat LLM's hidden states
(``docs/algorithms.md`` §11).

:class:`ZImageProcess` is the process of a diffusers ``ZImagePipeline``. What differs from SD3
(:mod:`hf_control_ft.processes.stable_diffusion_3`, whose precision, decoding, LoRA format and cards it keeps):

* **network**: the transformer takes a *list* of latents ``(C, 1, h, w)`` and a list of caption embeddings of
  each prompt's own length, at time ``1 - s`` (``(1000 - t) / 1000``), and predicts the negated velocity;
  :class:`GuidedZImageTransformer` calls it so and returns the velocity ``v`` of ``x_s = (1 - s) x_0 + s eps``;
* **guidance**: classifier-free guidance as the pipeline writes it, ``v_c + g (v_c - v_u)`` (``g = 0``: off;
  ``g`` is ``guidance_scale``, so SD's weight is ``1 + g``); the pipeline's optional CFG renormalisation and
  truncation are off at its defaults and not offered;
* **conditioning**: the pipeline's ``encode_prompt`` (chat template, Qwen3 hidden states of the second-to-last
  layer, the prompt's valid tokens only): kept as ``(embeds (B, L, D) zero-padded, lengths (B,))``; condition
  features = the mean of the valid tokens' embeddings ``(B, D)``;
* **schedule**: ``linspace(1, 1/K, K)`` noise levels, shifted by ``mu`` of the image sequence length when the
  scheduler shifts dynamically, as the exact flow transitions;
* **LoRA**: attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and MLP (``w1``, ``w2``, ``w3``) projections of
  every block (main and refiners), saved with ``ZImagePipeline.save_lora_weights``.
"""

from __future__ import annotations

import torch
from torch import nn

from .flux import packed_image_size, shifted_sigmas
from .prompt_embeds import masked_mean, padded, valid_tokens
from .sd_components import GuidedUNet, _autocast
from .stable_diffusion_3 import StableDiffusion3Process

Z_IMAGE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


class GuidedZImageTransformer(GuidedUNet):
    """A Z-Image transformer as ``model(sample (B, C, h, w), t = 1000 s) -> v (B, C, h, w)`` fp32 (module
    docstring); ``guidance_scale`` is the pipeline's ``g`` (``> 0``: classifier-free guidance)."""

    @property
    def do_guidance(self) -> bool:
        return self.guidance_scale > 0

    def set_condition(self, conditioning, negative=None) -> None:
        """``conditioning`` = ``(embeds (B, L, D), lengths (B,))``; ``negative`` the same for the negative prompt
        (batch 1 or B), required when guiding."""
        if self.do_guidance and negative is None:
            raise ValueError("guidance_scale > 0 needs negative prompt embeddings")
        self.prompt_embeds, self.lengths = (t.detach() for t in conditioning)
        self.negative_embeds = None if negative is None else tuple(t.detach() for t in negative)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        B = sample.shape[0]
        autocast_dtype, dtype = self._precision(sample)
        captions = valid_tokens(self.prompt_embeds, self.lengths)
        x, t = sample, timestep
        if self.do_guidance:
            neg, neg_lengths = self.negative_embeds
            negative = valid_tokens(neg, neg_lengths)
            captions = captions + (negative if len(negative) == B else negative * B)
            x, t = torch.cat([sample, sample]), torch.cat([timestep, timestep])
        with _autocast(sample.device, autocast_dtype):
            out = self.unet(list(x.to(dtype).unsqueeze(2).unbind(0)), (1000 - t) / 1000, [c.to(dtype) for c in captions],
                            return_dict=False)[0]
        v = -torch.stack([o.float() for o in out]).squeeze(2)  # the pipeline negates the transformer's output
        if self.do_guidance:
            v_c, v_u = v.chunk(2)
            return v_c + self.guidance_scale * (v_c - v_u)
        return v


class ZImageProcess(StableDiffusion3Process):
    """A ``ZImagePipeline`` as the controlled process (module docstring); ``options.guidance_scale`` is the
    pipeline's ``g`` (default 5.0; Z-Image-Turbo runs at 0 with 8 steps), ``max_sequence_length`` the caption
    length limit (default 512)."""

    family = "z-image"
    option_defaults = {"guidance_scale": 5.0, "max_sequence_length": 512}  # ZImagePipeline's
    guidance_off_at = 0.0  # g <= 0: no classifier-free guidance
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    default_targets = Z_IMAGE_TARGETS

    def guided_network(self, denoiser: nn.Module, options) -> nn.Module:
        return GuidedZImageTransformer(denoiser, options.guidance_scale, options.dtype)

    def latent_shape(self, height, width) -> tuple:
        height, width = packed_image_size(self.pipeline, height, width, default=1024)  # the pipeline's default size
        scale = self.pipeline.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels, height // scale, width // scale)

    def schedule_options(self, shape, num_inference_steps: int) -> dict:
        return shifted_sigmas(self.pipeline.scheduler.config, (shape[1] // 2) * (shape[2] // 2), num_inference_steps)

    def pooled_dim(self) -> int:
        return int(self.pipeline.text_encoder.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: list[str], pooled: bool = False):
        """``(embeds, lengths)`` from the pipeline's ``encode_prompt`` (and the mean-pooled condition features)."""
        rows, _ = self.pipeline.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                              max_sequence_length=self.options.max_sequence_length)
        conditioning = padded(rows)
        return (conditioning, masked_mean(*conditioning)) if pooled else conditioning

    batched_conditioning = (True, True)


__all__ = ["ZImageProcess", "GuidedZImageTransformer", "Z_IMAGE_TARGETS"]
