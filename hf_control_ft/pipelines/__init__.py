"""Inference pipelines that sample what the trainers trained (LoRA control and learned initial noise)."""

from .controlled import ControlledDiffusionPipeline, ControlledStableDiffusionPipeline

__all__ = ["ControlledDiffusionPipeline", "ControlledStableDiffusionPipeline"]
