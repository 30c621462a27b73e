"""SEIKO's resumable run directory: the settings a run may not change, per-round state, per-phase seeds.

``output_dir`` of a SEIKO run holds ``seiko_config.json`` (written by the first run; a restart with settings
that define what was already collected is refused), ``feedback/`` (:mod:`hf_control_ft.feedback.store`) and
``trainer_state/``: after each completed round the adapters (``"control"`` and the frozen ``"previous"``), the
two initial-noise models and the counters, written as safetensors + JSON into a new version directory that is
switched in atomically (:class:`~hf_control_ft.utils.versioned_dir.VersionedDirectory`).

All randomness of a round is drawn from generators seeded by ``(seed, round, phase)`` (:func:`round_seed`), so
a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

from ..core.control import CONTROL_ADAPTER, load_lora_state_dict, lora_state_dict
from ..utils.versioned_dir import VersionedDirectory

PREVIOUS_ADAPTER = "previous"
FEEDBACK_DIR = "feedback"
STATE_DIR = "trainer_state"
STATE_NAME = "state.json"
SEIKO_CONFIG_NAME = "seiko_config.json"
# fields that must not change between a run and its resumption (they define what was already collected)
RESUME_KEYS = ("num_rounds", "queries_per_round", "seed", "optimism", "alpha", "beta", "num_inference_steps", "eta",
               "learn_initial_noise", "lora_rank", "lora_alpha", "lora_target_modules", "noise_num_steps")
_PHASES = {"sample": 1, "reward": 2, "ts": 3, "value": 4, "noise": 5, "drift": 6}


def round_seed(seed: int, round_index: int, phase: str) -> int:
    """Seed of the generator of one phase of one round: resumption redraws exactly the same numbers."""
    return (seed * 1_000_003 + round_index * 101 + _PHASES[phase]) % (2**63 - 1)


def round_generator(seed: int, round_index: int, phase: str) -> torch.Generator:
    return torch.Generator().manual_seed(round_seed(seed, round_index, phase))


def check_resume_config(config, output_dir: str) -> None:
    """Saves ``config`` on the first run; on a restart refuses settings in :data:`RESUME_KEYS` that changed."""
    path = os.path.join(output_dir, SEIKO_CONFIG_NAME)
    if not os.path.exists(path):
        config.save(path)
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    current = config.to_dict()
    changed = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if changed:
        raise ValueError(f"{output_dir} holds a run with different {changed} "
                         f"({ {k: saved.get(k) for k in changed} } vs { {k: current.get(k) for k in changed} }); "
                         "use another output_dir to start a new run")


def _store(output_dir: str) -> VersionedDirectory:
    root = os.path.join(output_dir, STATE_DIR)
    return VersionedDirectory(root, os.path.join(root, "current"))


def save_round_state(output_dir: str, model, initial_noise, previous_noise, counters: dict) -> str:
    """Writes the state after a completed round and switches to it atomically; returns its directory.

    ``counters`` must hold ``completed_rounds``; everything in it is stored in ``state.json``.
    """
    store = _store(output_dir)
    completed = int(counters["completed_rounds"])
    name = f"round_{completed:04d}"
    tmp = store.begin(name)
    for adapter in (CONTROL_ADAPTER, PREVIOUS_ADAPTER):
        weights = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model, adapter).items()}
        save_file(weights, os.path.join(tmp, f"adapter_{adapter}.safetensors"), metadata={"format": "pt"})
    if initial_noise is not None:
        for label, module in (("initial_noise", initial_noise), ("previous_initial_noise", previous_noise)):
            weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(weights, os.path.join(tmp, f"{label}.safetensors"), metadata={"format": "pt"})
    state = {**counters, "rng": "per-(seed, round, phase) generators, see seiko_state.round_seed", "time": time.time()}
    with open(os.path.join(tmp, STATE_NAME), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    # keep the live state and the one before it
    return store.commit(name, keep={f"round_{completed - 1:04d}"})


def load_round_state(output_dir: str, model, initial_noise, previous_noise) -> dict | None:
    """Loads the live state into the modules; returns its counters (``None`` before the first round ends)."""
    directory = _store(output_dir).current()
    if directory is None:
        return None
    with open(os.path.join(directory, STATE_NAME), encoding="utf-8") as f:
        state = json.load(f)
    for adapter in (CONTROL_ADAPTER, PREVIOUS_ADAPTER):
        load_lora_state_dict(model, load_file(os.path.join(directory, f"adapter_{adapter}.safetensors")),
                             adapter_name=adapter)
    if initial_noise is not None:
        initial_noise.load_state_dict(load_file(os.path.join(directory, "initial_noise.safetensors")))
        previous_noise.load_state_dict(load_file(os.path.join(directory, "previous_initial_noise.safetensors")))
    return state
