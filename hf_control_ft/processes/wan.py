"""Wan text-to-video as a controlled process: a 3-D flow transformer on video latents ``(C, F, h, w)``, UMT5 prompts,
classifier-free guidance (``docs/algorithms.md`` §11).

:class:`WanProcess` is the process of a diffusers ``WanPipeline`` (Wan 2.1 T2V 1.3B / 14B, Wan 2.2 TI2V-5B). What
differs from SD3 (:mod:`hf_control_ft.processes.stable_diffusion_3`):

* **samples are videos**: the sampler's state is the latent video ``(C, (num_frames - 1) / 4 + 1, H / 8, W / 8)``;
  decoding (the causal video VAE, undoing its per-channel latent statistics) gives ``(B, F, 3, H, W)`` in
  ``[0, 1]``, which is what rewards and oracles receive (:mod:`hf_control_ft.rewards.video`: any image reward per
  frame, temporal consistency, or the user's ``fn(videos, prompts)``);
* **network**: the transformer called as the pipeline calls it (``timestep = 1000 s``; Wan 2.2 TI2V's
  ``expand_timesteps``: one timestep per latent token), guided ``v_u + w (v_c - v_u)`` with the negative prompt
  (default ``""``, guidance 5.0);
* **schedule**: Wan checkpoints ship a ``UniPCMultistepScheduler`` on flow noise levels (``use_flow_sigmas``,
  ``flow_shift``); the process samples with the exact flow transitions of a ``FlowMatchEulerDiscreteScheduler`` with
  the same shift on the solver's own noise levels (``shift s / (1 + (shift - 1) s)`` of its ``K`` evenly spaced
  ``s`` from 1), not with the multistep solver, whose steps are not Gaussian transitions. ``pipe.load_lora_weights`` + the pipeline's own
  scheduler still runs the trained network (its deterministic solver, as ``sampler="ode"`` does);
* **conditioning**: the pipeline's ``encode_prompt`` (cleaned prompt, UMT5 last hidden state, zero-padded to
  ``max_sequence_length``); condition features = the mean of the prompt's valid (non-padding) token embeddings;
* **LoRA**: self- and cross-attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and the MLP (``ffn.net.0.proj``,
  ``ffn.net.2``), saved with ``WanPipeline.save_lora_weights``.

Wan 2.2 A14B (two experts switched at a noise boundary, ``transformer_2``) is refused: the control of one network is
what this process trains.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core.flow_matching import is_flow_scheduler
from .qwen_image import decode_normalised
from .sd_components import GuidedUNet
from .stable_diffusion_3 import StableDiffusion3Process

WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def flow_scheduler_of(scheduler):
    """The ``FlowMatchEulerDiscreteScheduler`` whose noise levels a Wan scheduler samples on: the scheduler itself, or
    for a multistep solver on flow sigmas (``UniPCMultistepScheduler`` / ``DPMSolverMultistepScheduler`` with
    ``use_flow_sigmas`` or ``prediction_type="flow_prediction"``) a flow scheduler with its ``flow_shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if is_flow_scheduler(scheduler):
        return scheduler
    cfg = scheduler.config
    if cfg.get("use_flow_sigmas") or cfg.get("prediction_type") == "flow_prediction":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                                               shift=float(cfg.get("flow_shift") or 1.0))
    raise ValueError(f"WanPipeline with {type(scheduler).__name__}: the Wan process needs flow-matching noise levels "
                     "(FlowMatchEulerDiscreteScheduler, or a multistep solver with use_flow_sigmas)")


class GuidedWanTransformer(GuidedUNet):
    """A Wan transformer as ``model(sample (B, C, F, h, w), t = 1000 s) -> v`` fp32 with classifier-free guidance
    (:class:`GuidedUNet`'s); ``expand_timesteps`` gives every latent token the step's timestep (Wan 2.2 TI2V)."""

    def __init__(self, transformer: nn.Module, guidance_scale: float, autocast_dtype, expand_timesteps: bool):
        super().__init__(transformer, guidance_scale, autocast_dtype)
        self.expand_timesteps = expand_timesteps

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.expand_timesteps:
            _, ph, pw = self.unet.config.patch_size
            frames, h, w = sample.shape[2:]
            timestep = timestep[:, None].expand(-1, frames * (h // ph) * (w // pw))
        return super().forward(sample, timestep)


class WanProcess(StableDiffusion3Process):
    """A ``WanPipeline`` as the controlled process (module docstring); ``options.num_frames`` (default 81, rounded to
    ``4k + 1`` as the pipeline does), ``height`` x ``width`` (default 480 x 832), ``fps`` (default 16, for saved
    videos), ``guidance_scale`` (default 5.0), ``max_sequence_length`` (default 512)."""

    family = "wan"
    option_defaults = {"guidance_scale": 5.0, "max_sequence_length": 512, "num_frames": 81, "fps": 16}
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    default_targets = WAN_TARGETS

    def check_pipeline(self, pipeline):
        if getattr(pipeline, "transformer_2", None) is not None:
            raise ValueError("WanPipeline with transformer_2 (Wan 2.2 A14B's two experts) is not supported: the process "
                             "trains the control of one network; use Wan 2.1 or Wan 2.2 TI2V-5B")
        return super().check_pipeline(pipeline)

    def flow_scheduler(self, pipeline):
        return flow_scheduler_of(pipeline.scheduler)

    def guided_network(self, denoiser: nn.Module, options) -> nn.Module:
        expand = bool(self.pipeline.config.get("expand_timesteps", False))
        return GuidedWanTransformer(denoiser, options.guidance_scale, options.dtype, expand)

    def latent_shape(self, height, width) -> tuple:
        vae, patch = self.pipeline.vae.config, self.pipeline.transformer.config.patch_size
        height, width = height or 480, width or 832  # the pipeline's defaults
        spatial, temporal = vae.scale_factor_spatial, vae.scale_factor_temporal
        if height % (spatial * patch[1]) or width % (spatial * patch[2]):
            raise ValueError(f"height and width must be multiples of {spatial * patch[1]} (VAE scale x patch size), "
                             f"got {height}x{width}")
        frames = max(self.options.num_frames // temporal * temporal + 1, 1)  # the pipeline's rounding to 4k + 1
        return (self.pipeline.transformer.config.in_channels, (frames - 1) // temporal + 1, height // spatial,
                width // spatial)

    def schedule_options(self, shape, num_inference_steps: int) -> dict:
        """A multistep flow solver's unshifted noise levels (``linspace(1, 1/T, K + 1)`` without the last), which the
        flow scheduler shifts as the solver does; a flow scheduler keeps its own grid."""
        if is_flow_scheduler(self.pipeline.scheduler):
            return {}
        T = self.pipeline.scheduler.config.get("num_train_timesteps", 1000)
        return {"sigmas": np.linspace(1, 1 / T, num_inference_steps + 1)[:-1].tolist()}

    def pooled_dim(self) -> int:
        return int(self.pipeline.transformer.config.text_dim)

    @torch.no_grad()
    def encode(self, prompts: list[str], pooled: bool = False):
        """``prompt_embeds (B, L, D)`` from the pipeline's ``encode_prompt`` (and the mean of the valid tokens)."""
        embeds, _ = self.pipeline.encode_prompt(list(prompts), None, do_classifier_free_guidance=False,
                                                max_sequence_length=self.options.max_sequence_length,
                                                device=self.device)
        if not pooled:
            return embeds
        valid = (embeds != 0).any(-1, keepdim=True).float()  # the pipeline zero-pads after the valid tokens
        return embeds, (embeds.float() * valid).sum(1) / valid.sum(1).clamp(min=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent videos ``(B, C, f, h, w)`` -> videos ``(B, F, 3, H, W)`` in ``[0, 1]`` (differentiable)."""
        return decode_normalised(self.pipeline.vae, latents, self.options.dtype).permute(0, 2, 1, 3, 4)

    def pipeline_kwargs(self, num_prompts: int, num_inference_steps: int) -> dict:
        return {**super().pipeline_kwargs(num_prompts, num_inference_steps), "num_frames": self.options.num_frames}

    def save_options(self, directory: str, base_model: str | None = None) -> dict:
        return {**super().save_options(directory, base_model), "video": True, "fps": self.options.fps,
                "num_frames": self.options.num_frames}


__all__ = ["WanProcess", "GuidedWanTransformer", "WAN_TARGETS", "flow_scheduler_of"]
