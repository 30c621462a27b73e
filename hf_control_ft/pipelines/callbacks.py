"""A diffusers ``callback_on_step_end`` that applies a trained control only where it was trained.

The trained chain controls the noise levels from 1 down to the level after its last random step
(``GaussianTransitions.control_end_timestep``; ``docs/algorithms.md`` §11): below it the chain runs the pretrained
network (the step into a flow grid's floor and the step to 0 are deterministic), so the adapter never received a
gradient there. A stock pipeline with the LoRA loaded (``pipe.load_lora_weights(repo)``) applies it at every step,
the untrained low-noise ones included. :class:`ControlCutoff` switches the denoiser's LoRA layers off once the next
network call is at or below that timestep, and back on after the last step:

    pipe.load_lora_weights("me/elegant-sd3")
    image = pipe(prompt, callback_on_step_end=ControlCutoff(278.0)).images[0]   # the timestep from the model card

Timesteps are the scheduler's (``pipe.scheduler.timesteps``: ``s * 1000`` for flow matching).
"""

from __future__ import annotations

import torch

from ..core.control import tuner_layers

#: the pipeline components that may carry the control (Wan 2.2 has a second, low-noise transformer)
DENOISERS = ("unet", "transformer", "transformer_2")


def denoiser_tuner_layers(pipeline) -> list:
    """The LoRA layers of the pipeline's denoisers (never its text encoders)."""
    layers = []
    for name in DENOISERS:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            layers.extend(tuner_layers(module))
    return layers


class ControlCutoff:
    """``callback_on_step_end`` that turns the denoiser's LoRA off for network calls at timesteps ``<= end_timestep``
    and restores the layers' state after the last step (or on :meth:`restore`, e.g. in a ``finally``).

    Args:
        end_timestep: the last trained level in the scheduler's timestep units (the model card's "control ends at"
            timestep; ``None``: the control covers every step and the callback changes nothing).
    """

    def __init__(self, end_timestep: float | None):
        self.end_timestep = None if end_timestep is None else float(end_timestep)
        self._switched: list = []

    @property
    def tensor_inputs(self) -> list[str]:
        return []  # reads and returns no tensor

    def __call__(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        timesteps = pipeline.scheduler.timesteps
        upcoming = step_index + 1
        if upcoming >= len(timesteps):
            self.restore()
        elif (self.end_timestep is not None and not self._switched
              and float(timesteps[upcoming]) <= self.end_timestep):
            self._switched = [layer for layer in denoiser_tuner_layers(pipeline) if not layer.disable_adapters]
            for layer in self._switched:
                layer.enable_adapters(False)
        return {}

    def restore(self) -> None:
        """Switches the layers this callback turned off back on."""
        for layer in self._switched:
            layer.enable_adapters(True)
        self._switched = []


__all__ = ["ControlCutoff", "denoiser_tuner_layers", "DENOISERS"]
