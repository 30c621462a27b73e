"""LoRA drift control: the fine-tuned network is the pretrained one plus a peft LoRA adapter.

The **pretrained** model is the network with its adapters disabled, the **fine-tuned** model the same network
with the adapter enabled, so one set of base weights serves both and the control
``u_k = mu_ft(x_k) - mu_pre(x_k)`` is exactly zero at initialisation (peft initialises ``lora_B`` to zero).

Any ``torch.nn.Module`` called as ``model(sample, timestep, **kwargs)`` works; it may return a tensor, an
object with ``.sample`` (diffusers convention) or a tuple whose first element is the prediction. diffusers
models that carry ``PeftAdapterMixin`` (e.g. ``UNet2DConditionModel``) get the adapter through their own
``add_adapter`` (so ``save_lora_weights``/``load_lora_weights`` understand it); every other module gets peft's
``inject_adapter_in_model``.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

CONTROL_ADAPTER = "control"
DIFFUSERS_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_LORA_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)


def call_denoiser(model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
    """Calls ``model(sample, timestep, **kwargs)`` and returns the prediction tensor (shape of ``sample``)."""
    out = model(sample, timestep, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the denoiser returned {type(out).__name__}; expected a tensor, an object with `.sample` or a tuple"
    )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def candidate_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules LoRA can wrap (Linear, Conv1d/2d, Embedding), in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, _LORA_TYPES) and n]


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Attention projections for diffusers-style models, every ``nn.Linear`` otherwise."""
    names = candidate_module_names(model)
    if any(_matches(n, t) for n in names for t in DIFFUSERS_ATTENTION_TARGETS):
        return list(DIFFUSERS_ATTENTION_TARGETS)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n]
    if not linear:
        raise ValueError(
            "the model has no attention projections and no nn.Linear layers; pass lora_target_modules "
            f"explicitly. Candidate modules: {names[:50]}"
        )
    return linear


def resolve_target_modules(model: torch.nn.Module, target_modules: list[str] | None) -> list[str]:
    """Validates ``target_modules`` (suffixes of module names) against the model.

    Raises:
        ValueError: naming every target that matches no module and listing the candidates.
    """
    if target_modules is None:
        return default_target_modules(model)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = candidate_module_names(model)
    missing = [t for t in target_modules if not any(_matches(n, t) for n in names)]
    if missing:
        shown = names if len(names) <= 60 else names[:60] + [f"... ({len(names) - 60} more)"]
        raise ValueError(
            f"lora_target_modules {missing} match no Linear/Conv/Embedding module of "
            f"{type(model).__name__}. Candidate module names: {shown}"
        )
    return list(target_modules)


def add_lora_control(
    model: torch.nn.Module,
    rank: int,
    target_modules: list[str] | None = None,
    lora_alpha: float | None = None,
    adapter_name: str = CONTROL_ADAPTER,
) -> LoraConfig:
    """Freezes ``model`` and adds a trainable LoRA adapter ``adapter_name`` (zero-initialised control).

    Returns the ``LoraConfig`` used. ``lora_alpha`` defaults to ``rank`` (LoRA scale 1).
    """
    targets = resolve_target_modules(model, target_modules)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(lora_alpha if lora_alpha is not None else rank),
        target_modules=targets,
        init_lora_weights=True,
    )
    model.requires_grad_(False)
    if hasattr(model, "add_adapter") and hasattr(model, "set_adapters"):  # diffusers PeftAdapterMixin
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    set_active_adapter(model, adapter_name)
    return config


def tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def set_active_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """Makes ``adapter_name`` the active (and only trainable) adapter of every LoRA layer."""
    layers = tuner_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapter; call add_lora_control first")
    for layer in layers:
        layer.set_adapter(adapter_name)


def set_control_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Enables (fine-tuned model) or disables (pretrained model) every adapter layer."""
    for layer in tuner_layers(model):
        layer.enable_adapters(enabled)


def control_enabled(model: torch.nn.Module) -> bool:
    """Whether the adapters are currently enabled (fine-tuned model)."""
    layers = tuner_layers(model)
    return bool(layers) and not layers[0].disable_adapters


@contextlib.contextmanager
def pretrained_mode(model: torch.nn.Module):
    """Context in which ``model`` computes the pretrained network (adapters disabled); restores the state."""
    was_enabled = control_enabled(model)
    if was_enabled:
        set_control_enabled(model, False)
    try:
        yield model
    finally:
        if was_enabled:
            set_control_enabled(model, True)


def add_reference_adapter(model: torch.nn.Module, adapter_name: str, source: str = CONTROL_ADAPTER) -> None:
    """Adds a frozen copy ``adapter_name`` of the LoRA adapter ``source`` (same rank, alpha and targets).

    The model keeps ``source`` active and trainable. Refresh the copy with :func:`copy_adapter_weights`.
    """
    import copy

    peft_cfg = getattr(model, "peft_config", None)
    if not isinstance(peft_cfg, dict) or source not in peft_cfg:
        raise ValueError(f"the model has no LoRA adapter {source!r} to copy; call add_lora_control first")
    if adapter_name in peft_cfg:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    config = copy.deepcopy(peft_cfg[source])
    with warnings.catch_warnings():  # a second adapter is the point here, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        if hasattr(model, "add_adapter") and hasattr(model, "set_adapters"):  # diffusers PeftAdapterMixin
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
    # same dtype as the source (fp32 LoRA on a half-precision base): the copy is exact, and so is every refresh
    for ref, src in zip(lora_parameters(model, adapter_name), lora_parameters(model, source)):
        if ref.dtype != src.dtype:
            ref.data = ref.data.to(src.dtype)
    copy_adapter_weights(model, source, adapter_name)
    set_active_adapter(model, source)


def copy_adapter_weights(model: torch.nn.Module, source: str, target: str) -> None:
    """Copies the LoRA weights of adapter ``source`` into adapter ``target`` (same shapes) in place."""
    src, dst = lora_parameters(model, source), lora_parameters(model, target)
    if len(src) != len(dst) or not src:
        raise ValueError(f"adapters {source!r} ({len(src)} tensors) and {target!r} ({len(dst)}) do not match")
    with torch.no_grad():
        for a, b in zip(src, dst):
            b.copy_(a)


@contextlib.contextmanager
def reference_adapter_mode(model: torch.nn.Module, adapter_name: str):
    """Context in which ``model`` computes with the frozen adapter ``adapter_name`` active (adapters enabled).

    The adapter is activated in peft's inference mode (its weights keep ``requires_grad=False``), so gradients
    flow through the network's input but never into the reference adapter; the previously active adapter (and
    its trainability) is restored on exit. Used for the second KL term of SEIKO (KL to the previous round).
    """
    layers = tuner_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapter; call add_lora_control first")
    previous = [list(layer.active_adapters) for layer in layers]
    was_enabled = control_enabled(model)
    if not was_enabled:
        set_control_enabled(model, True)
    for layer in layers:
        layer.set_adapter(adapter_name, inference_mode=True)
    try:
        yield model
    finally:
        for layer, names in zip(layers, previous):
            layer.set_adapter(names)
        if not was_enabled:
            set_control_enabled(model, False)


def lora_parameters(model: torch.nn.Module, adapter_name: str = CONTROL_ADAPTER) -> list[torch.nn.Parameter]:
    """The LoRA parameters of ``adapter_name`` in a stable order."""
    pattern = re.compile(rf"\.lora_(A|B|embedding_A|embedding_B)\.{re.escape(adapter_name)}(\.|$)")
    return [p for n, p in model.named_parameters() if pattern.search(n)]


def lora_state_dict(model: torch.nn.Module, adapter_name: str = CONTROL_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's naming, with the adapter name removed (as peft saves them)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def load_lora_state_dict(model, state_dict, adapter_name: str = CONTROL_ADAPTER) -> None:
    """Loads weights saved by :func:`lora_state_dict`; fails loudly on unexpected or missing keys."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights do not fit the model: unexpected keys {unexpected[:10]}")
