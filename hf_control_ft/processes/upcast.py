"""Exact KL from half-precision weights: fp32 arithmetic, layer by layer (``kl_precision="upcast"`` / ``"tf32"``).

The per-step KL is a squared difference of two network outputs (``docs/algorithms.md`` §9). Its rounding floor
under mixed precision comes from half-precision *arithmetic*; the weights themselves are the model being
fine-tuned, whatever their storage. So the frozen network may stay in the run's half dtype (half the memory of
fp32 weights: 24 GB instead of 48 GB for a 12B FLUX transformer) while every call that feeds a KL computes in
fp32 from those weights: each layer upcasts its own weight for the duration of its call only.

:func:`install_upcast` wraps the ``forward`` of every layer that holds weights (linear, convolution, embedding,
group / layer / RMS norm) with a version that, while the returned :class:`UpcastSwitch` is on, casts its input,
weight and bias to fp32. With the switch off the layers run as before (under autocast for rollouts). The switch
is part of what gradient checkpointing restores when it recomputes a block
(:func:`~hf_control_ft.processes.sd_components.enable_adapter_aware_checkpointing`).

Cost: fp32 matrix work has no tensor-core path on NVIDIA GPUs unless TF32 is allowed, so the KL passes of
``"upcast"`` run at the GPU's fp32 rate (``docs/text_to_image.md``, ``benchmarks/sd_step.py``: a 49.9 s SD 1.5
iteration on an H200). ``kl_precision="tf32"`` (``UpcastSwitch(tf32=True)``) keeps everything above but lets
matmuls and convolutions in the KL passes (and, through PyTorch's global switches, in the backward sweep) use TF32
tensor cores: their inputs are rounded to a 10-bit mantissa (half-precision weights are exact in it: bf16 has 7
bits, fp16 10), products accumulate in fp32 and every activation stays fp32, so only the activations entering a
matmul lose bits, 2 fewer than bf16 autocast loses at *every* operation. That still leaves a KL floor (measured
with the emulation below: about 1e-4 nats per sample at guidance 1 and 8e-3 at 7.5 on the tiny SD's 10 steps,
against 0.03 / 3.1 for bf16 autocast; 0.015 / 1.28 on SD-1.5 shapes at 64 px and 2 steps), and the floor grows
with latent size, steps and guidance squared: a speed option for KLs far above it, not the exact one. CPUs have
no TF32: there ``"tf32"`` computes exactly as ``"upcast"``; ``emulate_tf32=True`` rounds the inputs of every linear and
convolution layer as TF32 does (round to nearest), forward and backward (the gradient entering the backward
matmuls), so ``benchmarks/kl_precision.py`` can measure its KL error without a GPU (attention's own two products
are not rounded by the emulation).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class UpcastSwitch:
    """On: the wrapped layers compute in fp32 (see the module docstring).

    Args:
        tf32: the KL passes may use TF32 matmuls / convolutions (``kl_precision="tf32"``; CUDA only).
        emulate_tf32: round linear / convolution inputs to TF32 while on (measurement on CPUs).
        dtype: the arithmetic of the wrapped layers while on: fp32, or fp64 for a reference computation of the
            same stored weights (``benchmarks/kl_precision.py``, ``tests/processes/test_upcast.py``).
    """

    def __init__(self, tf32: bool = False, emulate_tf32: bool = False, dtype: torch.dtype = torch.float32,
                 matmul_dtype: torch.dtype | None = None):
        self.on = False
        self.tf32 = bool(tf32)
        self.emulate_tf32 = bool(emulate_tf32)
        self.dtype = dtype
        #: ``kl_precision="delta"``: linear / convolution products in this (half) dtype on half inputs and weights,
        #: bias and everything else in ``dtype`` (tensor-core products, fp32 activations)
        self.matmul_dtype = matmul_dtype

    @contextlib.contextmanager
    def enabled(self, on: bool = True):
        previous, self.on = self.on, on
        try:
            yield
        finally:
            self.on = previous


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``t`` rounded to TF32's 10-bit mantissa (to nearest, ties away from zero), still as fp32."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


class _TF32Input(torch.autograd.Function):
    """Forward: a matmul input as TF32 sees it; backward: the gradient passes unchanged (the GPU's rounding is
    not differentiated either)."""

    @staticmethod
    def forward(ctx, t):
        return round_tf32(t)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _TF32GradInput(torch.autograd.Function):
    """Forward: identity on a matmul's output; backward: its gradient rounded, as it enters the backward matmuls."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return round_tf32(grad)


def _in(t, dtype):
    return None if t is None else t.to(dtype)


def _product(op, m, x, sw):
    """``op(x, weight, bias)`` (a linear or a convolution) in the switch's dtype, TF32-rounded when emulating."""
    d = sw.dtype
    if sw.matmul_dtype is not None:
        out = op(x.to(sw.matmul_dtype), m.weight.to(sw.matmul_dtype), None).to(d)
        return out if m.bias is None else out + (m.bias.to(d) if out.dim() < 3 or op is F.linear
                                                  else m.bias.to(d).reshape(-1, *([1] * (out.dim() - 2))))
    if not sw.emulate_tf32:
        return op(x.to(d), m.weight.to(d), _in(m.bias, d))
    return _TF32GradInput.apply(op(_TF32Input.apply(x.to(d)), _TF32Input.apply(m.weight.to(d)), _in(m.bias, d)))


def _linear(m, x, sw):
    return _product(F.linear, m, x, sw)


def _conv(m, x, sw):
    return _product(m._conv_forward, m, x, sw)


def _group_norm(m, x, sw):
    return F.group_norm(x.to(sw.dtype), m.num_groups, _in(m.weight, sw.dtype), _in(m.bias, sw.dtype), m.eps)


def _layer_norm(m, x, sw):
    return F.layer_norm(x.to(sw.dtype), m.normalized_shape, _in(m.weight, sw.dtype), _in(m.bias, sw.dtype), m.eps)


def _embedding(m, x, sw):
    return F.embedding(x, m.weight.to(sw.dtype), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq,
                       m.sparse)


def _rms_norm(m, x, sw):  # diffusers' RMSNorm, in the switch's dtype throughout (its own forward casts back to a half
    x = x.to(sw.dtype)     # weight dtype)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps)
    if m.weight is not None:
        x = x * m.weight.to(sw.dtype)
        if getattr(m, "bias", None) is not None:
            x = x + m.bias.to(sw.dtype)
    return x


def _kind(module: nn.Module):
    if isinstance(module, nn.Linear):
        return _linear
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv
    if isinstance(module, nn.GroupNorm):
        return _group_norm
    if isinstance(module, nn.LayerNorm):
        return _layer_norm
    if isinstance(module, nn.Embedding):
        return _embedding
    if type(module).__name__ == "RMSNorm" and hasattr(module, "eps"):
        return _rms_norm
    return None


def install_upcast(model: nn.Module, switch: UpcastSwitch | None = None) -> UpcastSwitch:
    """Wraps the layers of ``model`` (once) and returns the switch that turns fp32 arithmetic on; stored as
    ``model._hf_upcast_switch`` for the checkpointing recompute."""
    switch = switch or getattr(model, "_hf_upcast_switch", None) or UpcastSwitch()
    for module in model.modules():
        fn = _kind(module)
        if fn is None or getattr(module, "_hf_upcast", False):
            continue
        original = module.forward

        def forward(*args, _original=original, _fn=fn, _module=module, **kwargs):
            if switch.on and len(args) == 1 and not kwargs:
                return _fn(_module, args[0], switch)
            return _original(*args, **kwargs)

        module.forward = forward
        module._hf_upcast = True
    model._hf_upcast_switch = switch
    return switch


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` for a frozen network, keeping the parameters diffusers marks ``_keep_in_fp32_modules``
    in fp32 (as ``from_pretrained(torch_dtype=...)`` does; matched by name component) and without the warning
    diffusers' ``ModelMixin.to`` prints for every dtype cast, even when that list is empty."""
    nn.Module.to(module, dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if keep and dtype != torch.float32:
        for name, p in module.named_parameters():
            if any(k in name.split(".") for k in keep):
                p.data = p.data.float()
    return module


__all__ = ["UpcastSwitch", "install_upcast", "round_tf32", "cast_frozen"]
