"""Stable Diffusion building blocks of :class:`~hf_control_ft.processes.stable_diffusion.StableDiffusionProcess`.

The sampler works on a denoiser ``model(sample, t)`` and the trainer on a reward ``reward(x_0)``. Stable
Diffusion is brought to that form by two adapters, so the sampler, the KL accounting and the backward sweep
are the ones of every process:

* :class:`GuidedUNet` holds the UNet, the current batch's prompt embeddings and the guidance scale and
  returns the classifier-free-guided noise prediction ``eps_u + w (eps_c - eps_u)``. The pretrained and the
  fine-tuned means are both computed from *guided* predictions (adapters off / on), so the per-step KL is the
  KL between the transitions that are actually sampled.
* :class:`LatentReward` decodes latents with the VAE (differentiably) to images in ``[0, 1]`` and calls the
  user's ``reward_fn(images, prompts)`` with the batch's prompts.

Mixed precision (``mixed_precision="fp16"|"bf16"``): the VAE and text encoder are cast to the half dtype, the
LoRA parameters stay fp32, and sampling steps without a KL (rollouts, stage-1 data, inference) run the UNet
under ``torch.autocast``. The per-step KL is the squared difference of two UNet outputs times the guidance
scale, so half-precision rounding gives it a floor far above the KL of a small control
(``docs/algorithms.md`` §9). With ``kl_precision="fp32"`` (default) the UNet keeps fp32 weights and every UNet
call that feeds a KL runs without autocast (:meth:`GuidedUNet.full_precision`, the sampler's ``kl_context``);
on GPU, TF32 matmuls apply if the user enabled them. ``kl_precision="autocast"`` runs those calls in the half
dtype too (faster, UNet weights cast to the half dtype) and logs a warning: its KL floor is measured by
``benchmarks/kl_precision.py``. Sampler arithmetic (means, KL, noise) is fp32 in every mode.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.control import tuner_layers
from ..core.scheduling import as_stochastic_scheduler
from ..rewards.checks import reward_name
from ..rewards.image_rewards import call_reward
from .memory import tf32_matmuls
from .options import DTYPES, KL_PRECISIONS, StableDiffusionOptions  # noqa: F401 (re-exported)



# ------------------------------------------------------------------------------------------------ prompts
def load_prompts(prompts, column: str = "prompt") -> list[str]:
    """Prompts from a list of strings, a text file (one prompt per non-empty line) or a ``datasets.Dataset``
    column. Raises ``ValueError`` naming the problem when the result is empty or not strings."""
    source = prompts
    if isinstance(prompts, (str, os.PathLike)):
        if not os.path.isfile(prompts):
            raise ValueError(f"prompts: {prompts!r} is not a file; pass a list of prompts, a text file (one "
                             "prompt per line) or a datasets.Dataset")
        with open(prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    elif hasattr(prompts, "column_names"):  # datasets.Dataset
        if column not in prompts.column_names:
            raise ValueError(f"prompts: the dataset has no column {column!r}; columns: {prompts.column_names}")
        prompts = list(prompts[column])
    else:
        prompts = list(prompts)
    if not prompts:
        raise ValueError(f"prompts: no prompts found in {source!r}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; got {type(bad[0]).__name__} ({bad[0]!r})")
    return prompts


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device, return_pooled: bool = False):
    """CLIP text embeddings ``(B, L, D)`` as ``StableDiffusionPipeline.encode_prompt`` computes them
    (padding to ``model_max_length``, last hidden state); with ``return_pooled`` also the pooled embedding
    ``(B, D)`` (fp32), the per-prompt condition of the initial noise and the values."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = (ids != tokenizer.pad_token_id).long()
    out = text_encoder(ids, attention_mask=mask)
    return (out[0], out[1].float()) if return_pooled else out[0]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# ------------------------------------------------------------------------------- gradient checkpointing
def _adapter_state(layers) -> tuple:
    """``(enabled, active adapter names, active adapters trainable)`` of the LoRA layers (read from the first)."""
    if not layers:
        return (False, (), False)
    layer = layers[0]
    names = tuple(layer.active_adapters)
    trainable = False
    for attr in layer.adapter_layer_names:
        group = getattr(layer, attr, None)
        for name in names:
            if group is not None and name in group:
                item = group[name]
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                trainable = trainable or any(p.requires_grad for p in params)
    return (not layer.disable_adapters, names, trainable)


def _set_adapter_state(layers, state: tuple) -> None:
    enabled, names, trainable = state
    for layer in layers:
        if tuple(layer.active_adapters) != names:
            layer.set_adapter(list(names), inference_mode=not trainable)
        if not enabled and trainable:  # difference_mode: adapters off by their flag, weights still trainable
            layer._disable_adapters = True
        elif layer.disable_adapters == enabled:
            layer.enable_adapters(enabled)
            if enabled and not trainable:  # enable_adapters makes the active adapter trainable again
                layer.set_adapter(list(names), inference_mode=True)


def enable_adapter_aware_checkpointing(model: nn.Module) -> None:
    """Turns on diffusers' block-level gradient checkpointing with a checkpoint function that recomputes
    each block under the adapter state it had in the forward pass: LoRA on / off, and which adapter is
    active (SEIKO's frozen ``"previous"`` adapter or the trainable ``"control"`` one).

    Why: one sampler step runs the UNet two or three times, fine-tuned (adapters on), pretrained (adapters
    off) and, for SEIKO, with the previous round's adapter, and backpropagates through all of them. Plain
    checkpointing recomputes blocks during backward under whatever adapter state is current then, so the
    pretrained / reference branches would be recomputed with the trainable LoRA: wrong gradients (or a
    checkpoint metadata error).
    """
    layers = tuner_layers(model)

    def checkpoint_fn(module, *args):
        forward_state = _adapter_state(layers)
        switch = getattr(model, "_hf_upcast_switch", None)  # kl_precision="upcast": fp32 arithmetic on or off
        upcast = switch is not None and switch.on
        tf32 = torch.backends.cuda.matmul.allow_tf32  # as in the forward: KL passes set it (memory.tf32_matmuls)
        difference = getattr(layers[0], "_hf_difference_switch", None) if layers else None  # kl_precision="delta"
        difference_state = None if difference is None else difference.state

        def run(*inputs):
            current = _adapter_state(layers)
            if current != forward_state:
                _set_adapter_state(layers, forward_state)
            previous = None if difference is None else difference.state
            if difference is not None:
                difference.state = difference_state
            try:
                with switch.enabled(upcast) if switch is not None else contextlib.nullcontext(), \
                        tf32_matmuls(tf32):
                    return module(*inputs)
            finally:
                if difference is not None:
                    difference.state = previous
                if current != forward_state:
                    _set_adapter_state(layers, current)

        return checkpoint(run, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_fn)


# ----------------------------------------------------------------------------------------------- adapters
class GuidedUNet(nn.Module):
    """Presents a text-conditioned UNet as an unconditional denoiser ``model(sample, t) -> eps``.

    Args:
        unet: ``UNet2DConditionModel`` (with the LoRA control adapter).
        guidance_scale: classifier-free guidance weight ``w``; ``w <= 1`` runs the conditional branch only.
        autocast_dtype: run the UNet under ``torch.autocast`` with this dtype (None: no autocast).

    Call :meth:`set_condition` before sampling a batch. The output is fp32 ``(B, C, h, w)``.
    """

    def __init__(self, unet: nn.Module, guidance_scale: float = 7.5, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.unet = unet
        self.guidance_scale = float(guidance_scale)
        self.autocast_dtype = autocast_dtype
        self.prompt_embeds = None
        self.negative_embeds = None
        self._full_precision = False
        self._exact = False
        #: ``kl_precision="upcast"``: the switch of the network's per-layer fp32 arithmetic (:mod:`.upcast`)
        self.upcast = None

    @contextlib.contextmanager
    def full_precision(self):
        """Inside the block the UNet runs without autocast, in fp32: its own fp32 weights
        (``kl_precision="fp32"``), or its half-precision weights upcast layer by layer (``"upcast"``; ``"tf32"``: the
        same with TF32 matmuls on CUDA).

        The sampler enters it around the calls whose outputs are subtracted for the KL (``mu_ft - mu_pre``):
        a difference of two half-precision outputs is dominated by rounding when the control is small.
        """
        previous, self._full_precision = self._full_precision, True
        try:
            with tf32_matmuls(self.upcast is not None and self.upcast.tf32 and not self._exact), \
                    self.upcast.enabled() if self.upcast is not None else contextlib.nullcontext():
                yield
        finally:
            self._full_precision = previous

    @contextlib.contextmanager
    def exact(self):
        """Inside the block every call runs in fp32 arithmetic without TF32, whatever ``kl_precision`` trains with
        (``"autocast"``: half-precision passes; ``"tf32"``: TF32 matmuls): the exact KL of the same stored weights
        that the trainer logs (``ElegantTrainer``'s ``train/kl`` at its logging steps)."""
        previous, self._exact = self._exact, True
        try:
            with self.full_precision():  # which turns TF32 off while _exact is set
                yield
        finally:
            self._exact = previous

    def _precision(self, sample: torch.Tensor) -> tuple:
        """Checks that the batch's prompt embeddings are set and match ``sample``'s batch; returns ``(autocast dtype
        or None, the dtype the network's inputs are cast to)`` under the precision rules (class docstring)."""
        name = type(self).__name__
        if self.prompt_embeds is None:
            raise RuntimeError(f"{name}: no prompt embeddings set; call set_condition first")
        if self.prompt_embeds.shape[0] != sample.shape[0]:
            raise ValueError(f"{name}: {self.prompt_embeds.shape[0]} prompt embeddings for a batch of "
                             f"{sample.shape[0]} samples")
        autocast_dtype = None if self._full_precision else self.autocast_dtype
        return autocast_dtype, self._input_dtype(autocast_dtype)

    def _input_dtype(self, autocast_dtype):
        """The dtype the network's inputs are cast to."""
        if autocast_dtype is not None:
            return autocast_dtype
        return self.upcast.dtype if self.upcast is not None and self.upcast.on else self.unet.dtype

    @property
    def peft_config(self):
        return getattr(self.unet, "peft_config", None)

    @property
    def do_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def set_condition(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None = None) -> None:
        """``prompt_embeds`` ``(B, L, D)``; ``negative_embeds`` ``(B, L, D)`` or ``(1, L, D)`` (broadcast)."""
        if self.do_guidance and negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative (unconditional) prompt embeddings")
        self.prompt_embeds = prompt_embeds.detach()
        self.negative_embeds = None if negative_embeds is None else negative_embeds.detach()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.prompt_embeds is None:
            raise RuntimeError("GuidedUNet: no prompt embeddings set; call set_condition(prompt_embeds, ...) first")
        B = sample.shape[0]
        cond = self.prompt_embeds
        if cond.shape[0] != B:
            raise ValueError(f"GuidedUNet: {cond.shape[0]} prompt embeddings for a batch of {B} samples")
        autocast_dtype = None if self._full_precision else self.autocast_dtype
        dtype = self._input_dtype(autocast_dtype)
        with _autocast(sample.device, autocast_dtype):
            if self.do_guidance:
                neg = self.negative_embeds.expand(B, *self.negative_embeds.shape[1:])
                x = torch.cat([sample, sample]).to(dtype)
                t = torch.cat([timestep, timestep])
                eps = self.unet(x, t, encoder_hidden_states=torch.cat([neg, cond]).to(dtype)).sample
                eps_u, eps_c = eps.float().chunk(2)
                return eps_u + self.guidance_scale * (eps_c - eps_u)
            return self.unet(sample.to(dtype), timestep, encoder_hidden_states=cond.to(dtype)).sample.float()


class PooledGuidedNetwork(GuidedUNet):
    """:class:`GuidedUNet` for networks conditioned on ``(prompt_embeds (B, L, D), pooled (B, P))`` (SDXL's UNet,
    SD3's transformer). ``call(network, x, t, embeds, pooled)`` runs the network on one (possibly doubled) batch
    the way its pipeline does; this class checks the condition, builds the ``[negative, conditional]`` batch of
    classifier-free guidance, runs it under the precision rules and combines ``u + w (c - u)``. Output: fp32, the
    shape of ``sample``."""

    def __init__(self, network: nn.Module, guidance_scale: float, autocast_dtype: torch.dtype | None, call):
        super().__init__(network, guidance_scale, autocast_dtype)
        self.call = call

    def set_condition(self, conditioning, negative=None) -> None:
        """``conditioning`` = ``(prompt_embeds, pooled)``; ``negative`` the same for the negative prompt
        (batch 1 or B), required when guiding."""
        if self.do_guidance and negative is None:
            raise ValueError("guidance_scale > 1 needs negative (unconditional) prompt embeddings")
        embeds, pooled = conditioning
        self.prompt_embeds, self.pooled = embeds.detach(), pooled.detach()
        self.negative_embeds = None if negative is None else tuple(t.detach() for t in negative)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        autocast_dtype, dtype = self._precision(sample)
        B = sample.shape[0]
        embeds, pooled, x, t = self.prompt_embeds, self.pooled, sample, timestep
        if self.do_guidance:
            neg, neg_pooled = self.negative_embeds
            embeds = torch.cat([neg.expand(B, *neg.shape[1:]), embeds])
            pooled = torch.cat([neg_pooled.expand(B, *neg_pooled.shape[1:]), pooled])
            x, t = torch.cat([sample, sample]), torch.cat([timestep, timestep])
        with _autocast(sample.device, autocast_dtype):
            out = self.call(self.unet, x.to(dtype), t, embeds.to(dtype), pooled.to(dtype)).float()
        if self.do_guidance:
            out_u, out_c = out.chunk(2)
            return out_u + self.guidance_scale * (out_c - out_u)
        return out


def decode_latents(vae, latents: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, C, h, w)`` latents -> ``(B, 3, 8h, 8w)`` fp32 images in ``[0, 1]`` (differentiable): ``latents /
    scaling_factor + shift_factor`` (SD3 / FLUX VAEs have a shift; SD 1.x / 2.x / XL have none) through the VAE."""
    dtype = vae.dtype if autocast_dtype is None else autocast_dtype
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with _autocast(latents.device, autocast_dtype):
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


class LatentReward:
    """``reward(latents)``: the process's differentiable decode to ``[0, 1]`` images (videos: ``(B, F, 3, H, W)``),
    then ``reward_fn(images, prompts)``.

    ``decode(latents)`` is the family's decode (:meth:`StableDiffusionProcess.decode`); ``prompts`` is the list of the
    current batch, set by the trainer. ``__name__`` is the user reward's name so that reward errors name it.
    """

    def __init__(self, decode, reward_fn):
        self.decode = decode
        self.reward_fn = reward_fn
        self.prompts: list[str] | None = None
        self.__name__ = reward_name(reward_fn)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.decode(latents)
        prompts = self.prompts if self.prompts is not None else None
        if prompts is not None and len(prompts) != latents.shape[0]:
            raise RuntimeError(f"LatentReward: {len(prompts)} prompts for {latents.shape[0]} latents")
        values = call_reward(self.reward_fn, images, prompts)
        if images.dim() == 5 and isinstance(values, torch.Tensor) and tuple(values.shape) != (images.shape[0],):
            raise ValueError(f"reward {self.__name__!r} returned shape {tuple(values.shape)} for videos of shape "
                             f"{tuple(images.shape)} (B, F, 3, H, W): it must give one value per video; an image "
                             "reward scores videos frame by frame when wrapped: hf_control_ft.rewards.PerFrameReward(fn)")
        return values.float() if isinstance(values, torch.Tensor) and values.is_floating_point() else values


# ------------------------------------------------------------------------------------------------ options
def latent_shape(pipeline, height: int | None, width: int | None) -> tuple[int, int, int]:
    """``(C, h, w)`` of the latents for ``height x width`` images (defaults: the UNet's sample size)."""
    scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    size = pipeline.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    height = height or size * scale
    width = width or size * scale
    if height % scale or width % scale:
        raise ValueError(f"height and width must be multiples of the VAE scale factor {scale}, got "
                         f"{height}x{width}")
    return (pipeline.unet.config.in_channels, height // scale, width // scale)


def check_supported_pipeline(pipeline):
    """Raises ``ValueError`` naming the pipeline when it is not a Stable Diffusion 1.x/2.x text-to-image pipeline
    (one CLIP text encoder, a ``UNet2DConditionModel``, a variance-preserving scheduler); returns the sampler's
    DDPM / DDIM copy of its scheduler (:func:`~hf_control_ft.core.scheduling.as_stochastic_scheduler`)."""
    name = type(pipeline).__name__
    supported = "StableDiffusionPipeline (SD 1.x / 2.x)"
    if "XL" in name or getattr(pipeline, "text_encoder_2", None) is not None:
        raise ValueError(f"{name}: SDXL pipelines (two text encoders, pooled embeddings, added time ids) are not "
                         f"supported yet; supported: {supported}")
    for attr in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipeline, attr, None) is None:
            raise ValueError(f"{name} has no {attr!r} component; supported: {supported}, "
                             "StableDiffusion3Pipeline (FLUX is not supported yet)")
    return as_stochastic_scheduler(pipeline.scheduler)  # raises for flow-matching / unknown schedulers
