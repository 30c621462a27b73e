"""The control adapter on disk in diffusers' LoRA format: ``pytorch_lora_weights.safetensors``.

Layout (what ``StableDiffusionLoraLoaderMixin.save_lora_weights`` writes, and ``load_lora_weights`` reads):

* tensors named ``unet.<module path>.lora_A.weight`` / ``...lora_B.weight`` (peft names, adapter name removed);
* safetensors metadata ``lora_adapter_metadata``: the adapter's ``LoraConfig.to_dict()`` with keys prefixed
  ``unet.``. Without it diffusers infers the rank from the weights and sets ``lora_alpha = r``, silently
  changing the LoRA scale whenever ``lora_alpha != r``.

Any denoiser (``UNet2DConditionModel``, ``UNet2DModel``, the toy MLP) is stored under the ``unet`` prefix; the
transformers of flow-matching pipelines (SD3, FLUX) under ``transformer``, written by the pipeline class's own
``save_lora_weights``. :func:`load_lora_file` reads either back for models without diffusers' loaders.
"""

from __future__ import annotations

import json
import os

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file

from ..core.control import CONTROL_ADAPTER, load_lora_state_dict, lora_state_dict, set_active_adapter

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"
PREFIX = "unet"
#: pipeline components an adapter file may hold, as diffusers names them in the weight keys
COMPONENTS = ("unet", "transformer")


def lora_component(state: dict) -> str:
    """``"unet"`` or ``"transformer"``: the component the weights of a LoRA file belong to."""
    for component in COMPONENTS:
        if any(k.startswith(component + ".") for k in state):
            return component
    raise ValueError(f"not a diffusers LoRA file of a {' / '.join(COMPONENTS)}: keys {sorted(state)[:5]}")


def save_lora_file(model: torch.nn.Module, lora_config: LoraConfig, save_directory: str,
                   adapter_name: str = CONTROL_ADAPTER, component: str = PREFIX, writer=None) -> str:
    """Writes the adapter of ``model`` with its metadata via diffusers' own writer; returns the file path.

    ``component``: the pipeline component the adapter belongs to, ``"unet"`` (SD 1.x / 2.x / XL, and any
    denoiser) or ``"transformer"`` (SD3, FLUX); ``writer``: the class whose ``save_lora_weights`` writes it
    (the pipeline class, e.g. ``StableDiffusion3Pipeline``; default ``StableDiffusionLoraLoaderMixin``), so
    that the family's stock ``pipe.load_lora_weights`` reads it.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    writer = writer or StableDiffusionLoraLoaderMixin
    weights = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in lora_state_dict(model, adapter_name).items()}
    if not weights:
        raise RuntimeError(f"the model has no weights for adapter {adapter_name!r}")
    metadata = json.loads(json.dumps(lora_config.to_dict(), default=_jsonable))
    writer.save_lora_weights(save_directory, **{f"{component}_lora_layers": weights,
                                                f"{component}_lora_adapter_metadata": metadata})
    return os.path.join(save_directory, LORA_WEIGHTS_NAME)


def _jsonable(value):
    if isinstance(value, (set, tuple)):
        return sorted(value) if all(isinstance(v, str) for v in value) else list(value)
    return str(value)


def read_lora_config(path: str) -> LoraConfig:
    """The ``LoraConfig`` stored in the metadata of a diffusers LoRA file (prefix ``unet.`` removed)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if LORA_METADATA_KEY not in meta:
        raise ValueError(f"{path} has no {LORA_METADATA_KEY!r} metadata: cannot recover rank / lora_alpha / "
                         "target modules (save it with hf_control_ft or diffusers' save_lora_weights with "
                         "unet_lora_adapter_metadata)")
    packed = json.loads(meta[LORA_METADATA_KEY])
    prefix = next((p for p in COMPONENTS if any(k.startswith(p + ".") for k in packed)), PREFIX)
    values = {k[len(prefix) + 1:]: v for k, v in packed.items() if k.startswith(prefix + ".")}
    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in values.items() if k in known})


def load_lora_file(path: str) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """``(state_dict, lora_config)``: weights in peft naming (prefix removed) and the adapter config."""
    state = load_file(path)
    prefix = lora_component(state) + "."
    others = [k for k in state if not k.startswith(prefix)]
    if others:
        raise ValueError(f"{path}: only '{prefix}*' LoRA weights are supported, found {others[:5]}")
    return {k[len(prefix):]: v for k, v in state.items()}, read_lora_config(path)


def attach_lora_file(model: torch.nn.Module, path: str, adapter_name: str = CONTROL_ADAPTER) -> LoraConfig:
    """Adds adapter ``adapter_name`` to ``model`` from a diffusers LoRA file and loads its weights.

    Uses diffusers' ``add_adapter`` where the model has it, peft's ``inject_adapter_in_model`` otherwise; the
    base weights are frozen. Returns the adapter's ``LoraConfig``.
    """
    state, config = load_lora_file(path)
    model.requires_grad_(False)
    if hasattr(model, "add_adapter") and hasattr(model, "set_adapters"):
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    set_active_adapter(model, adapter_name)
    load_lora_state_dict(model, state, adapter_name)
    return config
