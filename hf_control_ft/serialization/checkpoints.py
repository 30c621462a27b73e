"""Training checkpoints: crash-safe directories of safetensors + JSON (never pickle), found again by step.

Layout (diffusers' training-script convention)::

    <output_dir>/checkpoint-<global_step>/
        lora.safetensors            LoRA weights of the control adapter
        optimizer.safetensors       optimizer state tensors (e.g. AdamW moments), flattened
        initial_noise/              the learned initial-noise model (when there is one)
        trainer_state.json          global step, optimizer hyper-parameters, LR-schedule state, metric history

A checkpoint is written to ``checkpoint-<step>.tmp`` and renamed into place (an atomic ``os.replace`` on one
filesystem), so a process killed mid-write never leaves a half checkpoint under a valid name.
"""

from __future__ import annotations

import os
import re
import shutil

import torch

PREFIX = "checkpoint-"
_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX}{step}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``[(step, path), ...]`` of the complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _PATTERN.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def resolve_checkpoint(output_dir: str | None, resume_from_checkpoint: str | None) -> str | None:
    """``"latest"`` -> the newest checkpoint in ``output_dir`` (``None`` when there is none yet, so a first run
    and a restarted run use the same command); a path -> that checkpoint, which must exist."""
    if resume_from_checkpoint in (None, "", False):
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, "trainer_state.json")):
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a checkpoint directory "
                                f"(no trainer_state.json); available: {[p for _, p in list_checkpoints(output_dir)]}")
    return resume_from_checkpoint


def begin(output_dir: str, step: int) -> str:
    """Creates and returns the temporary directory a checkpoint is written into."""
    tmp = checkpoint_path(output_dir, step) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(output_dir: str, step: int, total_limit: int | None = None) -> str:
    """Moves the finished temporary directory into place, then deletes the oldest beyond ``total_limit``."""
    final = checkpoint_path(output_dir, step)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(final + ".tmp", final)
    if total_limit is not None:
        for _, path in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Splits ``optimizer.state_dict()`` into flat tensors (for safetensors) and JSON-able metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_state_tensors`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
