"""Training checkpoints: crash-safe directories of safetensors + JSON (never pickle), found again by step.

Layout (diffusers' training-script convention)::

    <output_dir>/checkpoint-<global_step>/
        lora.safetensors            LoRA weights of the control adapter
        optimizer.safetensors       optimizer state tensors (e.g. AdamW moments), flattened
        initial_noise/              the learned initial-noise model (when there is one)
        trainer_state.json          global step, optimizer hyper-parameters, LR-schedule state, metric history

A checkpoint is written to ``checkpoint-<step>.tmp-<pid>``, its files fsynced, and renamed into place (an atomic
``os.replace`` on one filesystem), so a process killed mid-write never leaves a half checkpoint under a valid
name. Non-finite weights are never written (:func:`check_finite`), and resuming validates the checkpoint it
picks (:func:`validate_checkpoint`): with ``"latest"`` a damaged one is reported by file name and the newest
intact one is used instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..utils.versioned_dir import fsync_dir, fsync_tree
from .lora_io import LORA_WEIGHTS_NAME
from .saved import INITIAL_NOISE_DIR

logger = logging.getLogger(__name__)

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


class CheckpointError(RuntimeError):
    """A checkpoint directory is unreadable or holds non-finite weights; the message names the file."""


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raises ``FloatingPointError`` naming the first tensor with NaN / inf values (never checkpoint those)."""
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FloatingPointError(f"{what}: tensor {name!r} has non-finite values; refusing to write them")


def validate_checkpoint(path: str) -> None:
    """Reads every file of a checkpoint (JSON and safetensors) and checks the weights are finite.

    Raises :class:`CheckpointError` naming the damaged file.
    """
    state_path = os.path.join(path, "trainer_state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {state_path} is unreadable: {err}") from None
    required = ["lora.safetensors"] + (["optimizer.safetensors"] if isinstance(state, dict) and "optimizer" in state
                                       else [])
    for name in required:  # a checkpoint missing a file it needs is incomplete, whatever else it holds
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"checkpoint file {os.path.join(path, name)} is missing: the checkpoint is "
                                  "incomplete")
    for root, _, names in os.walk(path):
        for name in sorted(names):
            file = os.path.join(root, name)
            if name.endswith(".safetensors"):
                try:
                    tensors = load_file(file)
                except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                    raise CheckpointError(f"checkpoint file {file} is unreadable: {err}") from None
                try:
                    check_finite(tensors, file)
                except FloatingPointError as err:
                    raise CheckpointError(str(err)) from None
            elif name.endswith(".json"):
                try:
                    with open(file, encoding="utf-8") as f:
                        json.load(f)
                except (OSError, ValueError) as err:
                    raise CheckpointError(f"checkpoint file {file} is unreadable: {err}") from None


def resolve_checkpoint(output_dir: str | None, resume_from_checkpoint: str | None) -> str | None:
    """``"latest"`` -> the newest *intact* checkpoint in ``output_dir`` (``None`` when there is none yet, so a
    first run and a restarted run use the same command; damaged ones are logged by file name and skipped); a
    path -> that checkpoint, which must exist and be intact (else :class:`CheckpointError` naming the file)."""
    if resume_from_checkpoint in (None, "", False):
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        for _, path in reversed(found):
            try:
                validate_checkpoint(path)
                return path
            except CheckpointError as err:
                logger.warning("skipping damaged checkpoint: %s; trying an older one", err)
        if found:
            raise CheckpointError(f"every checkpoint in {output_dir} is damaged ({[p for _, p in found]}); "
                                  "start a new run with overwrite_output_dir=True")
        return None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and output_dir and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)  # "checkpoint-N" relative to output_dir
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a checkpoint directory "
                                f"(no trainer_state.json); available: {[p for _, p in list_checkpoints(output_dir)]}")
    validate_checkpoint(path)
    return path


def begin(output_dir: str, step: int) -> str:
    """Creates and returns the temporary directory a checkpoint is written into."""
    tmp = f"{checkpoint_path(output_dir, step)}.tmp-{os.getpid()}"  # unique per process
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(output_dir: str, step: int, total_limit: int | None = None) -> str:
    """Moves the finished temporary directory into place, then deletes the oldest beyond ``total_limit``."""
    final = checkpoint_path(output_dir, step)
    tmp = f"{final}.tmp-{os.getpid()}"
    fsync_tree(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(output_dir)
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


def write_checkpoint(output_dir: str, step: int, weights: dict[str, torch.Tensor], state: dict, optimizer=None,
                     lr_schedule=None, initial_noise=None, total_limit: int | None = None) -> str:
    """Writes ``checkpoint-<step>`` (layout in the module docstring) atomically; returns its path.

    ``weights``: the LoRA tensors; ``state``: JSON-able trainer state (step, history, config, ...). Raises
    ``FloatingPointError`` (and writes nothing) when a weight or optimizer tensor is not finite.
    """
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    check_finite(weights, f"checkpoint-{step} LoRA weights")
    state = dict(state)
    tensors = None
    if optimizer is not None:
        tensors, meta = optimizer_state_tensors(optimizer)
        check_finite(tensors, f"checkpoint-{step} optimizer state")
        state["optimizer"] = meta
        state["lr_schedule"] = lr_schedule.state_dict()  # JSON-able: LambdaLR stores no functions
    if initial_noise is not None:
        check_finite(dict(initial_noise.state_dict()), f"checkpoint-{step} initial-noise model")
    tmp = begin(output_dir, step)
    save_file(weights, os.path.join(tmp, "lora.safetensors"))
    if tensors is not None:
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    if initial_noise is not None:
        initial_noise.save_pretrained(os.path.join(tmp, "initial_noise"))
    with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    return commit(output_dir, step, total_limit)


def read_checkpoint(path: str, device) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor] | None]:
    """``(lora_weights, state, optimizer_tensors or None)`` of a checkpoint written by :func:`write_checkpoint`."""
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    weights = load_file(os.path.join(path, "lora.safetensors"), device=str(device))
    optim = None
    if "optimizer" in state:
        optim = load_file(os.path.join(path, "optimizer.safetensors"), device=str(device))
    return weights, state, optim


def finished_model_files(output_dir: str | None) -> list[str]:
    """Names of a saved model's files in ``output_dir`` (the adapter, the initial-noise model)."""
    names = (LORA_WEIGHTS_NAME, INITIAL_NOISE_DIR)
    return [n for n in names if output_dir and os.path.exists(os.path.join(output_dir, n))]


def claim_output_dir(output_dir: str, overwrite: bool, resuming: bool = False) -> None:
    """A fresh run: refuses an ``output_dir`` that holds checkpoints or a finished model (unless ``overwrite``,
    which deletes them), so a new run never mixes with, later resumes, or silently overwrites an old one.

    ``resuming``: the run was asked to resume (``"latest"``) and found no checkpoint. A finished model without
    checkpoints cannot be continued: resuming would train it again from the start and overwrite it, so that is
    refused too, naming what to do instead.
    """
    found = list_checkpoints(output_dir)
    finished = finished_model_files(output_dir)
    if not found and not finished:
        return
    if not overwrite:
        if found:
            names = ", ".join(os.path.basename(p) for _, p in found)
            raise FileExistsError(f"{output_dir} already holds a run ({names}); pass resume_from_checkpoint='latest' "
                                  "to continue it, overwrite_output_dir=True to delete its checkpoints and start "
                                  "over, or another output_dir")
        why = (" (resume_from_checkpoint='latest' found no checkpoint: it would train again from the start and "
               "overwrite the model)" if resuming else "")
        raise FileExistsError(f"{output_dir} already holds a finished model ({', '.join(finished)}) and no "
                              f"checkpoint to continue it from{why}; pass overwrite_output_dir=True to replace it, "
                              "or another output_dir")
    for _, path in found:
        shutil.rmtree(path)
    for name in finished:  # a crash of the new run must not leave the old model looking like its result
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
