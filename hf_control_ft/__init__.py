"""hf_control_ft: reward fine-tuning of diffusion models without reward collapse (ELEGANT, SEIKO)."""

from .config import ElegantConfig
from .control import add_lora_control, pretrained_mode
from .elegant_trainer import ElegantTrainer
from .feedback import FeedbackDataset
from .initial_noise import InitialNoiseModel
from .kl import gaussian_kl, gaussian_log_prob
from .oracle import Oracle, OracleAnswer
from .reward_ensemble import OptimisticReward, RewardEnsemble
from .sampler import ControlledSampler, Trajectory
from .scheduling import DiffusionSchedule
from .seiko_config import SeikoConfig
from .seiko_trainer import SeikoTrainer
from .value_function import ValueFunction

__version__ = "0.1.0"
__all__ = ["ElegantConfig", "ElegantTrainer", "InitialNoiseModel", "ControlledSampler", "Trajectory",
           "DiffusionSchedule", "ValueFunction", "add_lora_control", "pretrained_mode", "gaussian_kl",
           "gaussian_log_prob", "SeikoConfig", "SeikoTrainer", "Oracle", "OracleAnswer", "FeedbackDataset",
           "RewardEnsemble", "OptimisticReward", "ControlledDiffusionPipeline", "ControlledStableDiffusionPipeline"]

_LAZY = {"ControlledDiffusionPipeline": "pipelines", "ControlledStableDiffusionPipeline": "pipelines"}


def __getattr__(name):
    """The pipelines import transformers (CLIP); load them only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
