"""The frozen denoiser sharded across processes (FSDP2), the LoRA control replicated.

Without it every process holds the whole frozen network (FLUX.1: 24 GB in bf16, Qwen-Image: 41 GB). With
``ElegantConfig.fsdp`` -- set on by an accelerate FSDP config (``examples/accelerate/fsdp.yaml``) -- each block of the
network (every element of its top-level ``ModuleList`` s: UNet down / up blocks, transformer blocks) and the rest of
the network are wrapped with ``torch.distributed.fsdp.fully_shard``: each process keeps ``1 / N`` of the frozen
weights and all-gathers a block just before it runs (forward, and again for the backward pass's input gradients).

The LoRA parameters are *not* sharded (``ignored_params``): they are a fraction of a percent of the weights, so
each process keeps the whole adapter, gradients are averaged exactly as without FSDP (``BaseTrainer._sync_grads``),
and the optimiser, the EMA, checkpoints, saving and pushing see ordinary tensors: what is saved is the full adapter
on every process, with nothing to gather.

Every network call is then a collective: all processes must call the denoiser the same number of times in the same
order. The trainers do (equal shares of rollouts and batches on every process); a user calling
``trainer.sample(...)`` under FSDP must do it on every process.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def shard_blocks(module: nn.Module) -> list[nn.Module]:
    """The units sharded separately: the elements of every ``nn.ModuleList`` that is a direct child of ``module``
    (its blocks); the remaining parameters form the root unit."""
    return [block for child in module.children() if isinstance(child, nn.ModuleList) for block in child]


def shard_frozen_network(module: nn.Module, trainable, device: torch.device | str | None = None,
                         reshard_after_forward: bool = True) -> nn.Module:
    """Applies ``fully_shard`` to each block of ``module`` and to ``module`` itself, in place, leaving the
    ``trainable`` parameters (the LoRA weights) replicated and untouched. Needs an initialised process group.

    Args:
        module: the denoiser (a diffusers UNet / transformer with its adapters, or any network).
        trainable: parameters not to shard.
        device: where the shards live (default: the process group's device type, ``cuda`` or ``cpu``).
        reshard_after_forward: free a block's gathered weights after its forward (memory ~ one block; gathered
            again for backward) -- ``False`` keeps them until the backward pass (faster, more memory).

    Returns ``module`` (its class is now FSDP's subclass of the original; its attributes and forward are unchanged).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fsdp: no process group; launch with `accelerate launch` on several processes")
    device_type = torch.device(device).type if device is not None else (
        "cuda" if dist.get_backend() == "nccl" else "cpu")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    ignored = {p for p in trainable}
    blocks = shard_blocks(module)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored & set(block.parameters()))
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    frozen = sum(p.numel() for p in module.parameters() if p not in ignored)
    logger.info("fsdp: %d blocks and the rest of %s sharded over %d processes (%.2fB frozen parameters, 1/%d each); "
                "%d LoRA tensors replicated", len(blocks), type(module).__name__, dist.get_world_size(), frozen / 1e9,
                dist.get_world_size(), len(ignored))
    return module


def shard_if_requested(config, accelerator, process, device) -> bool:
    """``config.fsdp`` or an accelerate FSDP config, several processes: ``process``'s denoiser sharded across them
    with every adapter left whole, before the process moves to ``device`` (each process moves its shards only).
    Returns whether it was sharded."""
    from accelerate.utils import DistributedType

    if not (getattr(config, "fsdp", False) or accelerator.distributed_type == DistributedType.FSDP):
        return False
    if accelerator.num_processes == 1:
        logger.info("fsdp: one process, nothing to shard")
        return False
    network = process.lora_model
    adapters = [p for n, p in network.named_parameters() if ".lora_" in n]
    shard_frozen_network(network, adapters, device)
    return True


__all__ = ["shard_blocks", "shard_frozen_network", "shard_if_requested"]
