"""Rebuilding an :class:`~hf_control_ft.trainers.elegant.ElegantTrainer` from a saved control (a directory or a Hub
repo): what ``ElegantTrainer.from_pretrained`` does."""

from __future__ import annotations

from ..core.control import load_lora_state_dict
from ..models.initial_noise import InitialNoiseModel
from ..processes import process_from_pipeline
from ..processes.stable_diffusion import load_options
from ..serialization.lora_io import load_lora_file
from ..serialization.saved import read_saved, resolve_directory
from .elegant_config import RUN_LOCAL_FIELDS, ElegantConfig


def load_saved_trainer(cls, directory: str, model=None, scheduler=None, reward_fn=None, accelerator=None,
                       pipeline=None, prompts=None, **config_overrides):
    """``cls`` (an ``ElegantTrainer`` class) rebuilt from ``directory`` (``ElegantTrainer.from_pretrained``)."""
    directory = resolve_directory(directory)
    saved = read_saved(directory)
    # what describes the model; run-local fields (output_dir, logging_dir, trackers, ...) are this run's own,
    # never the publisher's, even in saves made before they were left out
    published = {k: v for k, v in saved["config"].items() if k not in RUN_LOCAL_FIELDS}
    config = ElegantConfig.from_dict(published, **config_overrides)
    if saved["options_path"] is not None:
        if pipeline is None:
            raise ValueError(f"{directory} was trained on a pipeline; pass pipeline= (a fresh base pipeline)")
        options = load_options(directory)
        process = process_from_pipeline(pipeline, config, prompts if prompts is not None else [""],
                                        **vars(options))
        trainer = cls(config, reward_fn=reward_fn, accelerator=accelerator, process=process)
    else:
        trainer = cls(config, model, scheduler, reward_fn, saved["sample_shape"], accelerator=accelerator)
    state, _ = load_lora_file(saved["lora_path"])
    load_lora_state_dict(trainer.process.lora_model, state)
    if config.learn_initial_noise:
        trainer.initial_noise = InitialNoiseModel.from_pretrained(saved["initial_noise_dir"]).to(trainer.device)
    return trainer


__all__ = ["load_saved_trainer"]
