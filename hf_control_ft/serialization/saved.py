"""Saving, loading and publishing a trained ELEGANT model.

A saved directory (also the layout of a Hub repo) holds:

* ``pytorch_lora_weights.safetensors``: the control adapter in diffusers' LoRA format with adapter metadata
  (:mod:`hf_control_ft.serialization.lora_io`), loadable with ``pipeline.load_lora_weights``;
* ``initial_noise/``: the learned initial-noise model (``model.safetensors`` + ``config.json``), when learned;
* ``elegant_config.json``: every training setting; ``sample_shape.json``: the shape of one sample;
* ``stable_diffusion.json`` (text-conditioned runs): guidance scale, negative prompt, size, base model;
* ``README.md``: the model card; ``sample_grid.png`` when a sample grid is given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from .lora_io import LORA_WEIGHTS_NAME, read_lora_config
from .model_card import render_model_card

INITIAL_NOISE_DIR = "initial_noise"
CONFIG_NAME = "elegant_config.json"
SAMPLE_SHAPE_NAME = "sample_shape.json"
SAMPLE_GRID_NAME = "sample_grid.png"
MODEL_CARD_NAME = "README.md"
OPTIONS_NAME = "stable_diffusion.json"  # the options of a Stable Diffusion process

logger = logging.getLogger(__name__)


def save_sample_grid(sample_grid, save_directory: str) -> str:
    """Writes ``sample_grid`` (a PIL image or the path of a PNG) as ``sample_grid.png``; returns its name."""
    target = os.path.join(save_directory, SAMPLE_GRID_NAME)
    if isinstance(sample_grid, (str, os.PathLike)):
        if not os.path.isfile(sample_grid):
            raise FileNotFoundError(f"sample_grid: no such file {sample_grid!r}")
        if not str(sample_grid).lower().endswith(".png"):
            raise ValueError(f"sample_grid must be a PNG file or a PIL image, got {sample_grid!r}")
        if os.path.abspath(sample_grid) != os.path.abspath(target):
            shutil.copyfile(sample_grid, target)
    elif hasattr(sample_grid, "save"):
        sample_grid.save(target, format="PNG")
    else:
        raise TypeError(f"sample_grid must be a PIL image or a path to a PNG, got {type(sample_grid).__name__}")
    return SAMPLE_GRID_NAME


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` is spelled as a Hub repo id (``owner/name`` or ``name``), not as a path."""
    return bool(name) and not os.path.isabs(name) and not name.startswith((".", "~")) and "\\" not in name \
        and name.count("/") <= 1 and all(name.split("/"))


def published_base_model(name: str | None, given_as_id: bool = False) -> str | None:
    """What a published file records of a base model: a Hub id, else ``None`` (a published file never names a
    path of the machine it was made on; whoever loads the model names their own copy with ``--base_model``).
    A name that is also a directory here is taken for a local path unless ``given_as_id`` (``--base_model_id``)."""
    if not is_hub_id(name) or (not given_as_id and os.path.exists(name)):
        return None
    return name


def _card_path(directory: str) -> str:
    """How a card refers to a local save: as given when relative, by its name when absolute (no local paths)."""
    return os.path.basename(os.path.normpath(directory)) if os.path.isabs(directory) else directory


def save_control(save_directory: str, process, config, initial_noise=None, reward: str | None = None,
                 metrics: dict | None = None, sample_grid=None, base_model: str | None = None,
                 repo_id: str | None = None, card_info: dict | None = None) -> None:
    """Writes everything listed in the module docstring for a trained control.

    Args:
        process: the controlled process (:mod:`hf_control_ft.processes`): writes the adapter in its family's
            LoRA format and its options, and gives the card's family fields.
        config: the training config: what describes the model is saved as ``elegant_config.json`` and shown on
            the card (``config.published_dict()``: no run-local field such as ``output_dir`` or ``logging_dir``).
        initial_noise: the learned initial-noise model, or ``None``.
        reward: the reward's name for the card.
        card_info: extra card fields (:func:`~hf_control_ft.serialization.model_card.render_model_card`), over
            those the process gives (prompts, negative prompt, family).
    """
    os.makedirs(save_directory, exist_ok=True)
    process.save_adapter(save_directory)
    lora_config = process.peft_config()
    if initial_noise is not None:
        initial_noise.save_pretrained(os.path.join(save_directory, INITIAL_NOISE_DIR))
    config.save(os.path.join(save_directory, CONFIG_NAME), published=True)  # no output_dir, logging_dir, ...
    with open(os.path.join(save_directory, SAMPLE_SHAPE_NAME), "w", encoding="utf-8") as f:
        json.dump(list(process.sample_shape), f)
    fields = process.save_options(save_directory, base_model)
    end = process.schedule.control_end_timestep  # below it the trained chain ran the base model (algorithms §11)
    if end is not None:
        fields["control_end_timestep"] = f"{end:.1f}"
        level = getattr(process.schedule, "control_end_level", None)
        fields["control_end_level"] = f"{level:.3f}" if level is not None else None
    grid_name = save_sample_grid(sample_grid, save_directory) if sample_grid is not None else None
    card = render_model_card(
        config, reward=reward or "(not recorded)", base_model=fields["base_model"], metrics=metrics,
        sample_grid=grid_name, repo_id=repo_id or _card_path(save_directory), conditional=fields["conditional"],
        guidance_scale=fields["guidance_scale"], lora_rank=lora_config.r, lora_alpha=lora_config.lora_alpha,
        target_modules=lora_config.target_modules,
        card_info={**{k: v for k, v in fields.items() if k not in ("base_model", "conditional", "guidance_scale")},
                   **(card_info or {})})
    with open(os.path.join(save_directory, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
        f.write(card)


def read_saved(directory: str) -> dict:
    """Reads the config dict (with the adapter's rank / alpha / targets from the LoRA metadata) and the
    sample shape of a saved directory."""
    path = os.path.join(directory, LORA_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {LORA_WEIGHTS_NAME}; is it an hf_control_ft save directory?")
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
        config = json.load(f)
    lora = read_lora_config(path)
    targets = lora.target_modules
    config.update(lora_rank=lora.r, lora_alpha=lora.lora_alpha,
                  lora_target_modules=[targets] if isinstance(targets, str) else sorted(targets))
    with open(os.path.join(directory, SAMPLE_SHAPE_NAME), encoding="utf-8") as f:
        shape = tuple(json.load(f))
    options = os.path.join(directory, OPTIONS_NAME)
    return {"config": config, "sample_shape": shape, "lora_path": path,
            "initial_noise_dir": os.path.join(directory, INITIAL_NOISE_DIR),
            "options_path": options if os.path.isfile(options) else None}


def resolve_directory(name_or_path: str, token: str | None = None, revision: str | None = None,
                      endpoint: str | None = None, cache_dir: str | None = None) -> str:
    """A local directory as is, otherwise the snapshot of the Hub repo ``name_or_path`` (downloaded)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message is the Hub's, and the local directory is left intact. ``cause``: the
    Hub's or the network's message alone (token masked)."""

    cause: str = ""


def mask_token(message: str, token: str | None) -> str:
    """``message`` with every occurrence of ``token`` replaced by ``***`` (errors, logs, cards never show it)."""
    return message.replace(token, "***") if token else message


def push_directory(folder: str, repo_id: str, private: bool = False, token: str | None = None,
                   commit_message: str = "Upload ELEGANT fine-tuned model", endpoint: str | None = None,
                   keep_local: bool = True):
    """Creates ``repo_id`` (if needed) and uploads ``folder`` in one commit; returns the ``CommitInfo``.

    ``keep_local``: ``folder`` outlives the call (the error then says where the files are); ``False`` for a
    temporary directory, which the error does not name.

    Raises:
        HubPushError: for any failure of the push, an HTTP error of the Hub or a network error (connection
            refused, DNS); the message is the Hub's or the network's, never the token; ``folder`` is not modified.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message)
    except Exception as err:  # noqa: BLE001 - HTTP errors, httpx / socket errors: all are a failed push
        message = mask_token(f"{type(err).__name__}: {err}", token)
        where = (f"the local files are kept in {folder!r}" if keep_local else
                 "nothing was kept locally: pass save_directory= to keep a copy")
        error = HubPushError(f"push to {repo_id!r} failed ({where}): {message}")
        error.cause = message  # the Hub's / the network's message alone (token masked)
        raise error from None
