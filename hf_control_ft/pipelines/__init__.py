"""Inference pipelines that sample what the trainers trained (LoRA control and learned initial noise).

* :class:`ControlledTextToImage`: any supported text-to-image family (SD 1.x / 2.x, SDXL, SD3, FLUX), the
  trained stochastic sampler or the family's own sampler with the LoRA;
* :class:`ControlledStableDiffusionPipeline`: a ``StableDiffusionPipeline`` subclass for SD 1.x / 2.x;
* :class:`ControlledDiffusionPipeline`: unconditional denoisers (e.g. the digits UNet);
* :class:`ControlCutoff`: a ``callback_on_step_end`` for stock pipelines that applies the LoRA only at the noise
  levels it was trained on.
"""

from .callbacks import ControlCutoff
from .controlled import ControlledDiffusionPipeline, ControlledStableDiffusionPipeline
from .text_to_image import ControlledTextToImage

__all__ = ["ControlCutoff", "ControlledDiffusionPipeline", "ControlledStableDiffusionPipeline", "ControlledTextToImage"]
