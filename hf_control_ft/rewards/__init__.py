"""Reward functions on images in ``[0, 1]`` (``reward(images, prompts) -> (B,)``) and the checks every reward
output passes before the trainer uses it."""

from .checks import check_reward, reward_name
from .image_rewards import (
                            AestheticReward,
                            BrightnessReward,
                            ClassifierReward,
                            ImageReward,
                            SaturationReward,
                            WeightedSumReward,
                            call_reward,
)

__all__ = ["check_reward", "reward_name", "call_reward", "ImageReward", "BrightnessReward", "SaturationReward",
           "WeightedSumReward", "AestheticReward", "ClassifierReward"]
