"""Exact KL from half-precision weights: fp32 arithmetic, layer by layer (``kl_precision="upcast"``).

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
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class UpcastSwitch:
    """On: the wrapped layers compute in fp32 (see the module docstring)."""

    def __init__(self):
        self.on = False

    @contextlib.contextmanager
    def enabled(self, on: bool = True):
        previous, self.on = self.on, on
        try:
            yield
        finally:
            self.on = previous


def _f32(t):
    return None if t is None else t.float()


def _linear(m, x):
    return F.linear(x.float(), m.weight.float(), _f32(m.bias))


def _conv(m, x):
    return m._conv_forward(x.float(), m.weight.float(), _f32(m.bias))


def _group_norm(m, x):
    return F.group_norm(x.float(), m.num_groups, _f32(m.weight), _f32(m.bias), m.eps)


def _layer_norm(m, x):
    return F.layer_norm(x.float(), m.normalized_shape, _f32(m.weight), _f32(m.bias), m.eps)


def _embedding(m, x):
    return F.embedding(x, m.weight.float(), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


def _rms_norm(m, x):  # diffusers' RMSNorm, in fp32 throughout (its own forward casts back to a half weight dtype)
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps)
    if m.weight is not None:
        x = x * m.weight.float()
        if getattr(m, "bias", None) is not None:
            x = x + m.bias.float()
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
                return _fn(_module, args[0])
            return _original(*args, **kwargs)

        module.forward = forward
        module._hf_upcast = True
    model._hf_upcast_switch = switch
    return switch


__all__ = ["UpcastSwitch", "install_upcast"]
