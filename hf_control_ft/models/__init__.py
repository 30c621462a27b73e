"""Small trainable networks of the algorithms: the initial-noise model, value functions (stage 1 and per step) and
SEIKO's reward ensemble (``docs/algorithms.md`` §4, §6)."""

from .initial_noise import InitialNoiseModel
from .networks import FieldNetwork, MLPDenoiser
from .reward_ensemble import OptimisticReward, RewardEnsemble
from .step_values import StepValueFunction
from .value_function import ValueFunction

__all__ = ["InitialNoiseModel", "ValueFunction", "StepValueFunction", "RewardEnsemble", "OptimisticReward",
           "FieldNetwork", "MLPDenoiser"]
