"""Qwen-Image as a controlled process: a double-stream flow transformer on packed latents, conditioned on Qwen2.5-VL
hidden states, with true classifier-free guidance and its norm rescaling (``docs/algorithms.md`` §11).

:class:`QwenImageProcess` is the process of a diffusers ``QwenImagePipeline``. What differs from FLUX.1
(:mod:`hf_control_ft.processes.flux`, whose packing and noise levels it shares):

* **guidance**: ``guidance_scale`` is the pipeline's ``true_cfg_scale`` (default 4.0) with the negative prompt
  (default ``" "``, as the model card runs it): ``g = v_u + w (v_c - v_u)`` rescaled token by token to the
  conditional prediction's norm, ``g * |v_c| / |g|`` (norms over the packed channels), exactly as the pipeline
  does. The mean of each transition is a deterministic function of the state, so the per-step KL between the
  fine-tuned and pretrained transitions stays the closed form. Guidance-distilled checkpoints
  (``guidance_embeds=True``) are refused;
* **conditioning**: the pipeline's ``encode_prompt`` (its system template, the last hidden state without the
  template's first 34 tokens, each prompt's valid tokens), carried as ``(embeds, lengths)``
  (:mod:`.prompt_embeds`); the transformer gets the batch's attention mask; condition features = the mean of the
  valid tokens' embeddings;
* **latents**: the sampler's state is the unpacked ``(C, h, w)``; decoding adds the 3-D VAE's frame axis and undoes
  the per-channel normalisation (``latents * latents_std + latents_mean``);
* **LoRA**: image- and text-stream attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``add_q_proj``,
  ``add_k_proj``, ``add_v_proj``, ``to_add_out``) and MLPs (``img_mlp`` / ``txt_mlp`` ``net.0.proj``, ``net.2``),
  saved with ``QwenImagePipeline.save_lora_weights``.
"""

from __future__ import annotations

import torch
from torch import nn

from .flux import FluxProcess, pack_latents, unpack_latents
from .prompt_embeds import attention_mask, masked_mean
from .sd_components import GuidedUNet, _autocast

QWEN_IMAGE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


def decode_normalised(vae, latents: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """``(B, C, F, h, w)`` latents of a VAE with per-channel ``latents_mean`` / ``latents_std`` (Qwen-Image, Wan) ->
    its output ``(B, 3, F, H, W)`` in ``[0, 1]``, fp32, differentiable."""
    dtype = vae.dtype if autocast_dtype is None else autocast_dtype
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
    with _autocast(latents.device, autocast_dtype):
        out = vae.decode((latents * std + mean).to(dtype)).sample
    return (out.float() / 2 + 0.5).clamp(0, 1)


class GuidedQwenImageTransformer(GuidedUNet):
    """A Qwen-Image transformer as ``model(sample (B, C, h, w), t = 1000 s) -> v (B, C, h, w)`` fp32 (module
    docstring); ``guidance_scale`` is ``true_cfg_scale`` (``> 1``: guided)."""

    def set_condition(self, conditioning, negative=None) -> None:
        """``conditioning`` = ``(embeds (B, L, D), lengths (B,))``; ``negative`` the same (batch 1 or B)."""
        if self.do_guidance and negative is None:
            raise ValueError("guidance_scale > 1 needs negative prompt embeddings")
        self.prompt_embeds, self.lengths = (t.detach() for t in conditioning)
        self.negative_embeds = None if negative is None else tuple(t.detach() for t in negative)

    def _velocity(self, tokens, t, embeds, lengths, grid, dtype):
        B, length = tokens.shape[0], int(lengths.max())
        embeds, lengths = embeds.expand(B, *embeds.shape[1:])[:, :length], lengths.expand(B)
        return self.unet(hidden_states=tokens, encoder_hidden_states=embeds.to(dtype),
                         encoder_hidden_states_mask=attention_mask(lengths, length), timestep=t / 1000,
                         img_shapes=[[grid]] * B, return_dict=False)[0].float()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        B, _, h, w = sample.shape
        autocast_dtype, dtype = self._precision(sample)
        tokens, grid = pack_latents(sample).to(dtype), (1, h // 2, w // 2)
        with _autocast(sample.device, autocast_dtype):
            v = self._velocity(tokens, timestep, self.prompt_embeds, self.lengths, grid, dtype)
            if self.do_guidance:
                v_u = self._velocity(tokens, timestep, *self.negative_embeds, grid, dtype)
        if self.do_guidance:
            guided = v_u + self.guidance_scale * (v - v_u)
            v = guided * (v.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return unpack_latents(v, h, w)


class QwenImageProcess(FluxProcess):
    """A ``QwenImagePipeline`` as the controlled process (module docstring); ``options.guidance_scale`` is
    ``true_cfg_scale`` (default 4.0), ``negative_prompt`` defaults to ``" "``, ``max_sequence_length`` to 512."""

    family = "qwen-image"
    option_defaults = {"guidance_scale": 4.0, "max_sequence_length": 512, "negative_prompt": " "}
    uses_negative_prompt = True
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    default_targets = QWEN_IMAGE_TARGETS

    def check_pipeline(self, pipeline):
        scheduler = super().check_pipeline(pipeline)
        if pipeline.transformer.config.guidance_embeds:
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported: "
                             "the process implements true classifier-free guidance (true_cfg_scale)")
        return scheduler

    def guided_network(self, denoiser: nn.Module, options) -> nn.Module:
        return GuidedQwenImageTransformer(denoiser, options.guidance_scale, options.dtype)

    def pooled_dim(self) -> int:
        config = self.pipeline.text_encoder.config
        return int(getattr(config, "text_config", config).hidden_size)

    @torch.no_grad()
    def encode(self, prompts: list[str], pooled: bool = False):
        """``(embeds, lengths)`` from the pipeline's ``encode_prompt`` (and the mean-pooled condition features)."""
        embeds, mask = self.pipeline.encode_prompt(list(prompts), device=self.device,
                                                   max_sequence_length=self.options.max_sequence_length)
        lengths = (torch.full((embeds.shape[0],), embeds.shape[1], device=embeds.device) if mask is None
                   else mask.sum(1)).long()
        conditioning = (embeds, lengths)
        return (conditioning, masked_mean(embeds, lengths)) if pooled else conditioning

    batched_conditioning = (True, True)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in ``[0, 1]`` (differentiable)."""
        return decode_normalised(self.pipeline.vae, latents.unsqueeze(2), self.options.dtype)[:, :, 0]

    def pipeline_kwargs(self, num_prompts: int, num_inference_steps: int) -> dict:
        kwargs = super().pipeline_kwargs(num_prompts, num_inference_steps)
        kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale")  # the pipeline's name of classifier-free guidance
        return kwargs


__all__ = ["QwenImageProcess", "GuidedQwenImageTransformer", "QWEN_IMAGE_TARGETS", "decode_normalised"]
