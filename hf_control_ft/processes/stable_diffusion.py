"""Stable Diffusion 1.x / 2.x as a controlled process: text-conditioned, classifier-free guidance, latents.

:class:`StableDiffusionProcess` is the :class:`~hf_control_ft.processes.base.ControlledProcess` of a diffusers
``StableDiffusionPipeline``:

* network: :class:`~hf_control_ft.processes.sd_components.GuidedUNet` (the UNet with the LoRA control on its
  attention projections, guided by the current batch's prompt embeddings);
* schedule: the pipeline's scheduler as DDPM / DDIM transitions (others with the same noise schedule are
  converted to DDIM on a copy; the pipeline keeps its own scheduler);
* conditioning: one prompt per sample, drawn uniformly from the prompt source (list, text file or
  ``datasets`` column), encoded with the pipeline's CLIP text encoder;
* decoding: the VAE, differentiably, to images in ``[0, 1]``; rewards and oracles are called as
  ``fn(images, prompts)``;
* persistence: the UNet adapter in diffusers' LoRA format (``pipe.load_lora_weights`` loads it) and
  ``stable_diffusion.json`` with guidance, negative prompt, size, precision and base model.

Conditions: the pooled CLIP text embedding of each prompt (``condition_dim`` = the text encoder's width)
conditions the stage-1 value and the learned initial noise, so each prompt gets its own start law
(``docs/algorithms.md`` §3), and the per-step values of ``drift_objective="value_guided"`` (prompt-conditional
``V_k(x, c)``, fitted on a subset of each rollout's latents: ``ElegantConfig.step_value_states_per_rollout``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os

import torch
from torch import nn

from ..core.control import add_lora_control
from ..core.difference_lora import install_difference
from ..rewards.checks import reward_name
from ..serialization.saved import OPTIONS_NAME, published_base_model
from .base import ControlledProcess
from .sd_components import (
    GuidedUNet,
    LatentReward,
    StableDiffusionOptions,
    check_supported_pipeline,
    decode_latents,
    enable_adapter_aware_checkpointing,
    encode_prompts,
    latent_shape,
    load_prompts,
)
from .stable_diffusion_features import LatentFeatures, PooledPixelFeatures
from .memory import EmbeddingCache, on_device, text_encoders
from .upcast import UpcastSwitch, cast_frozen, install_upcast

logger = logging.getLogger(__name__)


class StableDiffusionProcess(ControlledProcess):
    """A ``StableDiffusionPipeline`` as the controlled process.

    Args:
        pipeline: the base pipeline; UNet, VAE and text encoder are frozen, the UNet gets the LoRA control.
        config: training config (``seed``, LoRA and sampler fields; see :class:`ControlledProcess`).
        prompts: list of prompts, text file (one per line) or ``datasets.Dataset`` (column
            ``options.prompt_column``).
        options: :class:`~hf_control_ft.processes.sd_components.StableDiffusionOptions`.
    """

    family = "stable-diffusion"

    def __init__(self, pipeline, config, prompts, options: StableDiffusionOptions | None = None):
        from diffusers.training_utils import cast_training_params

        # the sampler's own copy of the scheduler; the pipeline's scheduler is left as the user set it
        self.pipeline = pipeline
        self.stochastic_scheduler = self.check_pipeline(pipeline)
        options = (options or StableDiffusionOptions()).for_family(self.family, self.option_defaults,
                                                                     self.uses_negative_prompt, self.guidance_off_at)
        self.options = options
        self.prompts = load_prompts(prompts, options.prompt_column)
        unet, vae = self.denoiser_module(), pipeline.vae
        precise_kl = options.kl_precision in ("fp32", "upcast", "tf32", "delta")
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()  # frozen: no dropout (a pipeline built from configs is in train mode)
            if module is unet and options.kl_precision == "fp32":
                cast_frozen(module, torch.float32)  # the KL passes run in the weights' precision
            elif options.dtype is not None:
                cast_frozen(module, options.dtype)  # "upcast" / "tf32": half weights, fp32 arithmetic in KL passes
        if options.kl_precision == "tf32":  # the backward sweep's matmuls run outside the KL context: TF32 there too
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            logger.warning(
                "kl_precision='tf32': TF32 matmuls for the whole run (as --allow_tf32) and in the KL passes; the KL "
                "has a rounding floor, 200-400x below 'autocast''s but growing with latent size, steps and guidance^2 "
                "(1.28 nats per sample at SD-1.5 shapes, 64 px, 2 steps, guidance 7.5: benchmarks/kl_precision.py, "
                "docs/numerics.md); use 'upcast' or 'fp32' when the KL must be exact")
        if options.dtype is not None and not precise_kl:
            logger.warning(
                "kl_precision='autocast' with mixed_precision=%r: the per-step KL is a difference of two "
                "half-precision UNet outputs and has a rounding floor (benchmarks/kl_precision.py measures it) in "
                "the passes that train; the KL logged at each logging step is evaluated exactly (fp32 arithmetic "
                "on the same weights) on the step's last micro-batch", options.mixed_precision)
        torch.manual_seed(config.seed)  # identical adapter initialisation on every process
        lora_config = add_lora_control(unet, config.lora_rank, config.lora_target_modules or self.default_targets,
                                       config.lora_alpha)
        cast_training_params(unet, torch.float32)  # LoRA parameters in fp32 under mixed precision
        if options.kl_precision == "delta":  # the LoRA layers' difference-propagation hooks (off until a KL pass);
            install_difference(unet, options.dtype)  # its products in the half dtype, activations fp32 (upcast below)
        upcast = None
        if options.kl_precision == "tf32" or (options.kl_precision in ("upcast", "autocast", "delta")
                                              and options.dtype is not None):
            # "autocast" too: off while training, on for the exact KL the trainer logs (exact_kl_context); "delta":
            # fp32 activations, each linear / convolution product on half inputs (tensor cores)
            upcast = install_upcast(unet, UpcastSwitch(tf32=options.kl_precision == "tf32", matmul_dtype=(
                options.dtype if options.kl_precision == "delta" else None)))
        if config.gradient_checkpointing:
            enable_adapter_aware_checkpointing(unet)
            if getattr(vae, "_supports_gradient_checkpointing", False):  # the video VAEs (Qwen-Image, Wan) do not
                vae.enable_gradient_checkpointing()
        shape = self.latent_shape(options.height, options.width)
        super().__init__(self.guided_network(unet, options), self.stochastic_scheduler, shape, config,
                         schedule_options=self.schedule_options(shape, config.num_inference_steps))
        self.model.upcast = upcast
        self.lora_model = unet
        self.lora_config = lora_config
        self._precise_kl = precise_kl
        self._negative_embeds = None
        self._pooled = None
        self.condition_dim = self.pooled_dim()
        batched = None if self.batched_conditioning is None else (*self.batched_conditioning, True)  # + pooled
        self._cache = EmbeddingCache(batched) if options.pre_compute_text_embeddings else None
        if options.enable_vae_slicing:
            vae.enable_slicing()  # the reward's and the oracle's decode, one image at a time

    # ------------------------------------------------------------------ what a family changes
    #: LoRA targets when ``lora_target_modules`` is None (None: the attention projections found in the network)
    default_targets = None
    #: the family pipeline's own defaults for options left ``None`` (``StableDiffusionOptions.for_family``)
    option_defaults = {"guidance_scale": 7.5}
    #: whether the family uses a negative prompt (classifier-free guidance); False: one is refused
    uses_negative_prompt = True
    #: ``guidance_scale`` at or below which classifier-free guidance is off (1 for ``u + w (c - u)``)
    guidance_off_at = 1.0

    def check_pipeline(self, pipeline):
        """Refuses a pipeline of another family; returns the sampler's copy of its scheduler."""
        return check_supported_pipeline(pipeline)

    def denoiser_module(self) -> nn.Module:
        return self.pipeline.unet

    def frozen_modules(self) -> list:
        return [self.pipeline.unet, self.pipeline.vae, self.pipeline.text_encoder]

    def guided_network(self, denoiser: nn.Module, options) -> nn.Module:
        return GuidedUNet(denoiser, options.guidance_scale, options.dtype)

    def latent_shape(self, height, width) -> tuple:
        return latent_shape(self.pipeline, height, width)

    def schedule_options(self, shape, num_inference_steps: int) -> dict:
        """``mu`` / ``sigmas`` the family's pipeline gives its flow-matching scheduler (none here)."""
        return {}

    def pooled_dim(self) -> int:
        return int(self.pipeline.text_encoder.config.hidden_size)

    def encode(self, prompts: list[str], pooled: bool = False):
        """What the guided network is conditioned on (here the prompt embeddings ``(B, L, D)``) and, with
        ``pooled``, also the per-prompt condition features ``(B, condition_dim)`` fp32."""
        return encode_prompts(self.pipeline.tokenizer, self.pipeline.text_encoder, list(prompts), self.device,
                              return_pooled=pooled)

    #: which parts of :meth:`encode`'s conditioning have one row per prompt (FLUX's text ids do not)
    batched_conditioning = None

    @property
    def encoders_off_device(self) -> bool:
        """The text encoders live on the CPU (``offload`` / ``pre_compute_text_embeddings``, :mod:`.memory`)."""
        return self.options.offload or self.options.pre_compute_text_embeddings

    def encoders_on_device(self, needed: bool = True):
        """The context in which the text encoders may run: on the accelerator for the block when they live on the
        CPU (:attr:`encoders_off_device`)."""
        return on_device(text_encoders(self.pipeline), self.device, enabled=self.encoders_off_device and needed)

    def _encoded(self, prompts: list[str]):
        """``(conditioning, pooled features)`` of ``prompts``: encoded now, or gathered from the per-prompt cache
        (``pre_compute_text_embeddings``: the whole prompt list is encoded the first time)."""
        if self._cache is None:
            with self.encoders_on_device():
                return self.encode(prompts, pooled=True)
        todo = self._cache.missing((list(self.prompts) if not len(self._cache) else []) + list(prompts))
        with self.encoders_on_device(needed=bool(todo)):
            for start in range(0, len(todo), 64):
                chunk = todo[start:start + 64]
                cond, pooled = self.encode(chunk, pooled=True)
                self._cache.add(chunk, ((cond,) if torch.is_tensor(cond) else tuple(cond)) + (pooled,))
        parts = self._cache.get(list(prompts), self.device)
        return (parts[0] if len(parts) == 2 else tuple(parts[:-1])), parts[-1]

    # ------------------------------------------------------------------ network and sampler
    def to(self, device) -> "StableDiffusionProcess":
        encoders = text_encoders(self.pipeline) if self.encoders_off_device else []  # they stay on the CPU
        for module in self.frozen_modules():
            if not any(module is e for e in encoders):
                module.to(device)
        self._negative_embeds = None
        return self

    @property
    def device(self) -> torch.device:
        return self.denoiser_module().device

    def kl_context(self):
        return self.model.full_precision if self._precise_kl else None

    def kl_difference(self) -> bool:
        return self.options.kl_precision == "delta"

    def exact_kl_context(self):
        """The context of an exact KL evaluation when the training passes are not exact (``kl_precision``
        ``"autocast"`` or ``"tf32"`` with half-precision weights); ``None`` when they are (``"delta"``'s difference
        propagation included: its error is relative to the difference, ``docs/numerics.md``)."""
        exact = self.options.dtype is None or self.options.kl_precision in ("fp32", "upcast", "delta")
        return None if exact else self.model.exact

    # ------------------------------------------------------------------ conditioning
    def draw_conditions(self, batch_size: int, generator: torch.Generator | None):
        """``batch_size`` prompts drawn uniformly (with replacement) from the prompt source."""
        idx = torch.randint(len(self.prompts), (batch_size,), generator=generator).tolist()
        return [self.prompts[i] for i in idx]

    def negative_embeds(self) -> torch.Tensor:
        if self._negative_embeds is None:
            self._negative_embeds = self.encode([self.options.negative_prompt])
        return self._negative_embeds

    def set_conditions(self, conditions) -> None:
        """Conditions the guided UNet and the reward on ``conditions`` (a list of prompts, one per sample)."""
        if conditions is None:
            raise ValueError("Stable Diffusion needs one prompt per sample")
        embeds, pooled = self._encoded(list(conditions))
        with self.encoders_on_device(needed=self._negative_embeds is None):
            negative = self.negative_embeds() if self.model.do_guidance else None
        self.model.set_condition(embeds, negative)
        self.current_conditions = list(conditions)
        self._pooled = pooled.detach()

    @torch.no_grad()
    def condition_features(self, conditions=None) -> torch.Tensor:
        """Pooled CLIP text embeddings ``(B, D)`` of ``conditions`` (prompts; default: the current batch's)."""
        if conditions is None:
            if self._pooled is None:
                raise RuntimeError("no prompts set: call set_conditions or prepare_batch first")
            return self._pooled
        return self._encoded(list(conditions))[1].detach()

    def check_conditions(self, conditions, num_samples: int | None):
        if conditions is None:
            if num_samples is None:
                raise ValueError("pass num_samples or prompts")
            return None, num_samples
        conditions = load_prompts(conditions)
        num_samples = len(conditions) if num_samples is None else num_samples
        if num_samples != len(conditions):
            raise ValueError(f"num_samples={num_samples} but {len(conditions)} prompts were given")
        return conditions, num_samples

    # ------------------------------------------------------------------ what the reward / oracle sees
    def reward_function(self, reward_fn):
        """The user's ``reward_fn(images, prompts)`` on the decoded latents of the current batch."""
        return _ConditionedReward(self, LatentReward(self.decode, reward_fn))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, 4, h, w)`` -> images ``(B, 3, H, W)`` in ``[0, 1]`` (differentiable)."""
        return decode_latents(self.pipeline.vae, latents, self.options.dtype)

    @torch.no_grad()
    def oracle_inputs(self, samples: torch.Tensor, conditions, chunk_size: int):
        """Decoded images ``(B, 3, H, W)`` in ``[0, 1]`` (on CPU) of stored latents, and their stored prompts."""
        latents = samples.to(self.device)
        images = torch.cat([self.decode(chunk).cpu() for chunk in latents.split(chunk_size)])
        return images, list(conditions)

    def reward_features(self, feature_extractor, feature_dim: int | None, chunk_size: int):
        """Reward heads on ``image_features(decode(latents))`` (default :class:`PooledPixelFeatures`)."""
        image_features = feature_extractor if feature_extractor is not None else PooledPixelFeatures()
        if isinstance(image_features, nn.Module):
            image_features.to(self.device).requires_grad_(False).eval()
        extractor = LatentFeatures(self.decode, image_features, chunk_size=chunk_size)
        if feature_dim is None:
            with torch.no_grad():
                probe = torch.zeros((1, *self.sample_shape), device=self.device)
                feature_dim = int(extractor(probe).shape[1])
        return extractor, int(feature_dim)

    # ------------------------------------------------------------------ the family's own pipeline call
    def pipeline_kwargs(self, num_prompts: int, num_inference_steps: int) -> dict:
        """Keyword arguments of the family pipeline's ``__call__`` that reproduce these options (guidance, size, the
        negative prompt of classifier-free guidance, the text context length): what ``sampler="ode"`` passes."""
        opts = self.options
        kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=opts.guidance_scale)
        if opts.height:
            kwargs.update(height=opts.height, width=opts.width)
        if self.model.do_guidance:  # classifier-free guidance: the negative prompt it trained with
            kwargs["negative_prompt"] = [opts.negative_prompt] * num_prompts
        if "max_sequence_length" in inspect.signature(self.pipeline.__call__).parameters:
            kwargs["max_sequence_length"] = opts.max_sequence_length
        return kwargs

    # ------------------------------------------------------------------ persistence
    def save_options(self, directory: str, base_model: str | None = None) -> dict:
        """Writes ``stable_diffusion.json`` (the base model only as a Hub id: never a local path) and returns the
        card's fields (the card shows a local base model by its directory name). ``base_model``: the Hub id the
        caller names (``--base_model_id``); else the path the pipeline was loaded from, published only when it is
        not a path of this machine."""
        base = base_model if base_model is not None else self.options.base_model
        published = published_base_model(base, given_as_id=base_model is not None)
        dataclasses.replace(self.options, base_model=published).save(os.path.join(directory, OPTIONS_NAME))
        unique = list(dict.fromkeys(self.prompts))
        return {"base_model": base, "conditional": True,
                "guidance_scale": self.options.guidance_scale, "family": self.family, "prompts": unique[:8],
                "num_prompts": len(unique), "negative_prompt": self.options.negative_prompt,
                "mixed_precision": self.options.mixed_precision}


    def run_settings(self) -> dict:
        prompts = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()
        memory = ("pre_compute_text_embeddings", "offload", "enable_vae_slicing")  # change no result
        options = {k: v for k, v in dataclasses.asdict(self.options).items() if k not in memory}
        return {**super().run_settings(), **options, "prompts_sha256": prompts}


class _ConditionedReward:
    """``reward(latents)`` with the process's current prompts: what the trainer calls."""

    def __init__(self, process: StableDiffusionProcess, latent_reward: LatentReward):
        self.process, self.latent_reward = process, latent_reward
        self.__name__ = reward_name(latent_reward.reward_fn)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        self.latent_reward.prompts = self.process.current_conditions
        return self.latent_reward(latents)


def load_options(directory: str) -> StableDiffusionOptions:
    """The ``stable_diffusion.json`` of a save directory."""
    return StableDiffusionOptions.load(os.path.join(directory, OPTIONS_NAME))


__all__ = ["StableDiffusionProcess", "StableDiffusionOptions", "load_options"]
