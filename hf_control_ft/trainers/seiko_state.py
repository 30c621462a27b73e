"""SEIKO's resumable run directory (the settings a run may not change, per-round state, per-phase seeds) and the
geometric-mixture reference rollout of its initial-noise stage (:func:`mixture_rollout`).

``output_dir`` of a SEIKO run holds ``seiko_config.json`` (written by the first run; a restart with settings
that define what was already collected is refused), ``feedback/`` (:mod:`hf_control_ft.feedback.store`) and
``trainer_state/``: after each completed round the adapters (``"control"`` and the frozen ``"previous"``), the
two initial-noise models and the counters, written as safetensors + JSON into a new version directory that is
switched in atomically (:class:`~hf_control_ft.utils.versioned_dir.VersionedDirectory`).

All randomness of a round is drawn from generators seeded by ``(seed, round, phase, rank)`` (:func:`round_seed`),
so a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from safetensors.torch import load_file, save_file

from ..core.control import CONTROL_ADAPTER, load_lora_state_dict, lora_state_dict
from ..core.kl import difference_kl
from ..utils.versioned_dir import VersionedDirectory, fsync_dir, write_atomic
from .elegant_config import RESUME_KEYS as ELEGANT_RESUME_KEYS

logger = logging.getLogger(__name__)

PREVIOUS_ADAPTER = "previous"
FEEDBACK_DIR = "feedback"
STATE_DIR = "trainer_state"
STATE_NAME = "state.json"
SEIKO_CONFIG_NAME = "seiko_config.json"
PROCESS_SETTINGS_NAME = "process_settings.json"
REPLACED_DIR = "replaced"
# settings a resumed run may not change: they define what was already collected and how it is used (train_steps,
# logging, output and oracle-transport settings may change; num_rounds may grow, with the budgets of the rounds
# already started unchanged)
RESUME_KEYS = ELEGANT_RESUME_KEYS + ("optimism", "beta", "bonus_scale", "ensemble_size", "ucb_ridge", "bonus_cap",
                                     "feature_std_floor", "reward_hidden", "reward_depth", "reward_train_steps",
                                     "reward_learning_rate", "reward_weight_decay", "reward_batch_size")
_PHASES = {"sample": 1, "reward": 2, "ts": 3, "value": 4, "noise": 5, "drift": 6, "value_fit": 7}


def round_seed(seed: int, round_index: int, phase: str, rank: int = 0) -> int:
    """Seed of the generator of one phase of one round on process ``rank``: resumption redraws exactly the same
    numbers (process 0 of a multi-process run draws what a single-process run draws)."""
    return (seed * 1_000_003 + round_index * 101 + _PHASES[phase] + rank * 1_000_000_007) % (2**63 - 1)


def round_generator(seed: int, round_index: int, phase: str, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(round_seed(seed, round_index, phase, rank))


def write_json(path: str, value) -> None:
    """Writes ``value`` as JSON atomically (:func:`~hf_control_ft.utils.versioned_dir.write_atomic`)."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} ({what}) is damaged: {err}. Restore it, or delete it to continue the run with the "
                         "current settings") from None


def _budgets(values: dict) -> list[int]:
    q, r = values.get("queries_per_round"), int(values.get("num_rounds") or 0)
    return [int(v) for v in q] if isinstance(q, list) else [int(q)] * r


def check_resume_config(config, output_dir: str, started_rounds: int, process_settings: dict) -> None:
    """Saves ``config`` (and ``process_settings``: base model, prompts, guidance, precision) on the first run; on
    a restart refuses settings in :data:`RESUME_KEYS` or process settings that changed, and budgets that
    changed for the ``started_rounds`` rounds whose queries were already drawn. A larger ``num_rounds`` extends
    a (finished) run: the saved settings are updated and the new rounds run."""
    path = os.path.join(output_dir, SEIKO_CONFIG_NAME)
    settings_path = os.path.join(output_dir, PROCESS_SETTINGS_NAME)
    current = config.to_dict()
    if not os.path.exists(path):
        write_json(path, current)
        write_json(settings_path, process_settings)
        return
    saved = _read_json(path, f"the settings of the run in {output_dir}")
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != current.get(k)]
    if os.path.exists(settings_path):
        saved_process = _read_json(settings_path, f"the model settings of the run in {output_dir}")
        changed += [f"process.{k}" for k in sorted(set(saved_process) | set(process_settings))
                    if saved_process.get(k) != process_settings.get(k)]
    else:
        saved_process = {}
    if changed:
        def value(k):
            return (saved_process.get(k[8:]), process_settings.get(k[8:])) if k.startswith("process.") else \
                (saved.get(k), current.get(k))
        raise ValueError(f"{output_dir} holds a run with different {changed} "
                         f"({ {k: value(k)[0] for k in changed} } vs { {k: value(k)[1] for k in changed} }); "
                         "use another output_dir (or overwrite_output_dir=True) to start a new run")
    if config.num_rounds < started_rounds:
        raise ValueError(f"{output_dir} holds a run that already started {started_rounds} rounds; num_rounds="
                         f"{config.num_rounds} would stop it midway: give num_rounds >= {started_rounds}")
    before, now = _budgets(saved), config.budgets()
    if before[:started_rounds] != now[:started_rounds]:
        raise ValueError(f"{output_dir} holds a run whose first {started_rounds} rounds were drawn with "
                         f"queries_per_round {before[:started_rounds]}; the new settings give "
                         f"{now[:started_rounds]}: keep those budgets (later rounds may change)")
    if saved != current:
        if config.num_rounds != saved.get("num_rounds"):
            logger.info("SEIKO run in %s: num_rounds %s -> %s", output_dir, saved.get("num_rounds"), config.num_rounds)
        write_json(path, current)
    if not os.path.exists(settings_path):
        write_json(settings_path, process_settings)


def replace_run(output_dir: str) -> str | None:
    """``overwrite_output_dir``: moves the run in ``output_dir`` (feedback, round states, settings) to
    ``output_dir/replaced/<UTC time>/`` and returns that directory (``None`` when there was no run). Paid oracle
    answers are never deleted: the new run does not read them, and the files stay for the user."""
    names = [n for n in (FEEDBACK_DIR, STATE_DIR, SEIKO_CONFIG_NAME, PROCESS_SETTINGS_NAME)
             if os.path.exists(os.path.join(output_dir, n))]
    if not names:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, k = os.path.join(output_dir, REPLACED_DIR, stamp), 0
    while os.path.exists(target):
        k += 1
        target = os.path.join(output_dir, REPLACED_DIR, f"{stamp}.{k}")
    os.makedirs(target)
    for name in names:
        os.rename(os.path.join(output_dir, name), os.path.join(target, name))
    fsync_dir(output_dir)
    logger.warning("overwrite_output_dir: the previous run in %s (%s) was moved to %s; this run starts afresh",
                   output_dir, ", ".join(names), target)
    return target


def state_store(output_dir: str) -> VersionedDirectory:
    """The versioned per-round state directory of a run (opened by the holder of the run lock)."""
    root = os.path.join(output_dir, STATE_DIR)
    return VersionedDirectory(root, os.path.join(root, "current"))


def save_round_state(store: VersionedDirectory, model, initial_noise, previous_noise, counters: dict) -> str:
    """Writes the state after a completed round and switches to it atomically; returns its directory.

    ``counters`` must hold ``completed_rounds``; everything in it is stored in ``state.json``. A round redone
    after a restart gets a new version name (``round_0002.1``): no version written earlier is replaced.
    """
    completed = int(counters["completed_rounds"])
    name, k = f"round_{completed:04d}", 0
    while os.path.exists(os.path.join(store.versions_dir, name)):
        k += 1
        name = f"round_{completed:04d}.{k}"
    live = store.current()
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
    return store.commit(name, keep={os.path.basename(live)} if live else set())


class RunStateError(RuntimeError):
    """No intact per-round state although versions exist; the message names the damaged files."""


def _load_version(directory: str, model, initial_noise, previous_noise) -> dict:
    path = os.path.join(directory, STATE_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        int(state["completed_rounds"]), int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunStateError(f"{path} is unreadable: {err}") from None
    files = [(f"adapter_{a}.safetensors", a) for a in (CONTROL_ADAPTER, PREVIOUS_ADAPTER)]
    loaded = {}
    names = [name for name, _ in files] + (["initial_noise.safetensors", "previous_initial_noise.safetensors"]
                                           if initial_noise is not None else [])
    for name in names:
        try:
            loaded[name] = load_file(os.path.join(directory, name))
        except Exception as err:  # noqa: BLE001 - missing or truncated safetensors
            raise RunStateError(f"{os.path.join(directory, name)} is unreadable: {type(err).__name__}: {err}") from None
    for name, adapter in files:
        load_lora_state_dict(model, loaded[name], adapter_name=adapter)
    if initial_noise is not None:
        initial_noise.load_state_dict(loaded["initial_noise.safetensors"])
        previous_noise.load_state_dict(loaded["previous_initial_noise.safetensors"])
    return state


def load_round_state(store: VersionedDirectory, model, initial_noise, previous_noise) -> dict | None:
    """Loads the live state into the modules; returns its counters (``None`` before the first round ends).

    A damaged live version (unreadable JSON or safetensors) is reported by file name and the newest intact
    earlier version is used instead: the rounds after it are redone from the feedback on disk (no answer is
    asked again). :class:`RunStateError` when no version is intact.
    """
    live = store.current()
    if live is None:
        return None
    candidates = [live] + [os.path.join(store.versions_dir, n) for n in reversed(store.versions())
                           if os.path.join(store.versions_dir, n) != live]
    errors = []
    for directory in candidates:
        try:
            state = _load_version(directory, model, initial_noise, previous_noise)
        except RunStateError as err:
            errors.append(str(err))
            logger.warning("SEIKO state: %s; trying an older round's state", err)
            continue
        if errors:
            logger.warning("SEIKO state recovered from %s (the rounds after it are redone)", directory)
        return state
    raise RunStateError(f"no intact SEIKO round state in {store.versions_dir}: " + "; ".join(errors))


@torch.no_grad()
def mixture_rollout(sampler, alpha: float, beta: float, x_T: torch.Tensor, generator: torch.Generator):
    """Rollout of SEIKO's geometric-mixture reference chain (mean ``mu_mix``, ``docs/algorithms.md`` §6) from ``x_T``
    with ``sampler`` (its ``"previous"`` reference adapter).

    Returns ``(x_0, cost)`` with ``cost = sum_k a b / (a+b) ||mu_pre - mu_prev||^2 / (2 s_k^2)``, ``(B,)``.
    """
    a, b, schedule = alpha, beta, sampler.schedule
    w = b / (a + b)
    x, cost = x_T, x_T.new_zeros(x_T.shape[0])
    for k in range(len(schedule)):
        if not schedule.is_stochastic(k):
            x = schedule.step_from_mean(sampler.mean(x, k, controlled=False), k, None)
            continue
        mu_prev, mu_pre, u = sampler.means(x, k, target="reference")
        cost += (a * b / (a + b)) * difference_kl(u, schedule.std[k])
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = schedule.step_from_mean((1 - w) * mu_pre + w * mu_prev, k, noise)
    return x, cost
