"""Reward functions on images in ``[0, 1]`` (``reward(images, prompts) -> (B,)``), the checks every reward
output passes before the trainer uses it, and rewards by name / file reference (:mod:`.registry`)."""

from .checks import check_reward, reward_name
from .clip_rewards import CLIPImageFeatures, CLIPScoreReward, PickScoreReward
from .image_rewards import (
    AestheticHead,
    AestheticReward,
    BrightnessReward,
    ClassifierReward,
    ImageReward,
    SaturationReward,
    WeightedSumReward,
    call_reward,
)
from .video import PerFrameReward, TemporalConsistencyReward
from .registry import BUILTIN_REWARDS, RewardSpecError, check_spec, load_reward, load_user_function

__all__ = ["PerFrameReward", "TemporalConsistencyReward", "check_reward", "reward_name", "call_reward", "ImageReward", "BrightnessReward", "SaturationReward",
           "WeightedSumReward", "AestheticHead", "AestheticReward", "ClassifierReward", "PickScoreReward",
           "CLIPScoreReward", "CLIPImageFeatures", "BUILTIN_REWARDS", "RewardSpecError", "check_spec", "load_reward",
           "load_user_function"]
