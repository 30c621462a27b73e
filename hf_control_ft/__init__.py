"""hf_control_ft: reward fine-tuning of diffusion models without reward collapse (ELEGANT, SEIKO).

Layers, lowest first (docs/architecture.md): ``utils`` < ``core`` < ``models`` < ``rewards`` < ``serialization``
< ``feedback`` < ``tasks`` < ``processes`` < ``trainers`` < ``pipelines``; each imports only layers below it.
"""

from .utils.quiet import silence_known_warnings

silence_known_warnings()

from .core.control import add_lora_control, pretrained_mode  # noqa: E402
from .core.flow_matching import FlowMatchSchedule
from .core.kl import gaussian_kl, gaussian_log_prob
from .core.sampler import ControlledSampler, Trajectory
from .core.scheduling import DiffusionSchedule
from .feedback.oracle import Oracle, OracleAnswer
from .feedback.reader import load_feedback
from .feedback.store import FeedbackDataset
from .models.initial_noise import InitialNoiseModel
from .models.reward_ensemble import OptimisticReward, RewardEnsemble
from .models.value_function import ValueFunction
from .processes import (
    ControlledProcess,
    FluxProcess,
    StableDiffusion3Process,
    StableDiffusionProcess,
    StableDiffusionXLProcess,
    process_from_pipeline,
)
from .trainers.elegant import ElegantTrainer
from .trainers.elegant_config import ElegantConfig
from .trainers.seiko import SeikoTrainer
from .trainers.seiko_config import SeikoConfig

__version__ = "0.1.0"
__all__ = ["ElegantConfig", "ElegantTrainer", "SeikoConfig", "SeikoTrainer", "ControlledProcess",
           "StableDiffusionProcess", "StableDiffusionXLProcess", "StableDiffusion3Process", "FluxProcess",
           "process_from_pipeline", "InitialNoiseModel", "ValueFunction", "ControlledSampler", "Trajectory",
           "DiffusionSchedule", "FlowMatchSchedule", "add_lora_control", "pretrained_mode", "gaussian_kl",
           "gaussian_log_prob", "Oracle", "OracleAnswer", "FeedbackDataset", "load_feedback", "RewardEnsemble",
           "OptimisticReward", "ControlledDiffusionPipeline", "ControlledStableDiffusionPipeline"]

_LAZY = {"ControlledDiffusionPipeline": "pipelines.controlled",
         "ControlledStableDiffusionPipeline": "pipelines.controlled"}


def __getattr__(name):
    """The pipelines import transformers (CLIP); load them only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
