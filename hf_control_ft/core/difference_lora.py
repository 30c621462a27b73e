"""LoRA layers as the source of a difference: the hooks of difference propagation and the context that turns them
on (:mod:`hf_control_ft.core.difference`, ``kl_precision="delta"``).

Inside :func:`difference_mode` every LoRA layer runs with its adapters off (the pretrained ``W x + b``, which the
difference rules carry as ``(W h + b, W dh)``), and its forward hook adds the adapters' own contribution:
``sum_target s B A (h + dh) - sum_base s B A h`` to the difference and ``sum_base s B A h`` to the base value. With
no base adapter the base is the pretrained network and the difference is the fine-tuned network's; with SEIKO's
frozen ``"previous"`` adapter as the base it is the difference to the previous round's network.
"""

from __future__ import annotations

import contextlib

import torch

from .control import tuner_layers
from .difference import difference_pair, difference_parts, set_matmul_dtype


class DifferenceSwitch:
    """``state``: ``None`` (off) or ``(base adapters, target adapters)``: the LoRA layers (run with adapters off)
    add ``sum_target lora(h + dh) - sum_base lora(h)`` to the difference and ``sum_base lora(h)`` to the base."""

    def __init__(self, matmul_dtype: torch.dtype | None = None):
        self.matmul_dtype = matmul_dtype
        self._state = None

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, value):  # the difference rules' products follow the active switch (set_matmul_dtype)
        self._state = value
        set_matmul_dtype(None if value is None else self.matmul_dtype)


def _lora(layer, name, x):
    """The adapter ``name``'s own term of a peft LoRA layer, ``s B A dropout(x)``."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(A.weight.dtype)
    return B(A(layer.lora_dropout[name](x))) * layer.scaling[name]


def install_difference(model: torch.nn.Module, matmul_dtype: torch.dtype | None = None) -> DifferenceSwitch:
    """Registers (once) the forward hooks of difference propagation on the LoRA layers of ``model``; returns their
    switch (stored on each layer as ``_hf_difference_switch``, for the gradient-checkpointing recompute)."""
    layers = tuner_layers(model)
    switch = getattr(layers[0], "_hf_difference_switch", None) if layers else None
    if switch is not None:
        return switch
    switch = DifferenceSwitch(matmul_dtype)

    def hook(layer, args, output):
        if switch.state is None:
            return output
        base_names, target_names = switch.state
        xh, xd = difference_parts(args[0])
        x_target = xh if xd is None else xh + xd.to(xh.dtype if not torch.is_autocast_enabled(xh.device.type)
                                                      else xd.dtype)
        oh, od = difference_parts(output)
        d = [_lora(layer, n, x_target) for n in target_names]
        for n in base_names:
            extra = _lora(layer, n, xh)
            oh = oh + extra.to(oh.dtype)
            d.append(-extra)
        if od is not None:
            d.append(od)
        if not d:
            return oh
        total = d[0]
        for t in d[1:]:
            total = total + t
        return difference_pair(oh, total)

    for layer in layers:
        layer.register_forward_hook(hook)
        layer._hf_difference_switch = switch
    return switch


@contextlib.contextmanager
def difference_mode(model: torch.nn.Module, target=("control",), base=()):
    """Inside the block ``model(...)`` returns a :class:`Difference`: the network with the ``base`` adapters
    (none: the pretrained network) carrying the difference of the network with the ``target`` adapters from it."""
    switch = install_difference(model)
    layers = tuner_layers(model)
    if any(any(getattr(layer, "use_dora", {}).values()) for layer in layers):
        raise ValueError("--kl_precision delta: DoRA adapters (use_dora) have a magnitude term the difference rules "
                         "do not carry; use --kl_precision upcast")
    off = [layer._disable_adapters for layer in layers]
    for layer in layers:  # the flag only: peft's enable_adapters(False) would also freeze the adapter's weights
        layer._disable_adapters = True
    previous, switch.state = switch.state, (tuple(base), tuple(target))
    try:
        yield
    finally:
        switch.state = previous
        for layer, was in zip(layers, off):
            layer._disable_adapters = was


__all__ = ["DifferenceSwitch", "install_difference", "difference_mode"]
