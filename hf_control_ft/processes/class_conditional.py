"""A class-conditional denoiser as a controlled process: ``model(sample, t, class_labels=labels)``.

The call convention of diffusers' class-conditional ``UNet2DModel`` (``num_class_embeds``) and of the
class-conditional :class:`~hf_control_ft.models.networks.MLPDenoiser`. Conditions are integer labels, drawn per
sample from ``class_probs`` (uniform by default); their features -- one-hot vectors, or rows of a given
``class_embeddings`` table (a stand-in for semantic prompt embeddings: classes with close embeddings get
close start laws, and a class never drawn in training still gets one) -- condition the initial noise and the
values. The reward is called as ``reward_fn(samples, labels)`` when it takes two
arguments, ``reward_fn(samples)`` otherwise.
"""

from __future__ import annotations

import torch

from ..rewards.image_rewards import call_reward
from .base import ControlledProcess


class ClassConditionalProcess(ControlledProcess):
    """A class-conditional denoiser on a DDPM / DDIM scheduler with a LoRA control.

    Args:
        model, scheduler, sample_shape, config, model_kwargs: as :class:`ControlledProcess`.
        num_classes: number of classes ``C``; labels are ``0 .. C-1``.
        class_probs: ``(C,)`` probabilities with which training batches draw their labels (default uniform; a 0
            keeps a class out of training).
        class_embeddings: ``(C, d)`` condition features per class (default: one-hot, ``d = C``).
    """

    family = "class-conditional"

    def __init__(self, model, scheduler, sample_shape, config, num_classes: int, class_probs=None,
                 model_kwargs: dict | None = None, class_embeddings=None):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        probs = torch.full((num_classes,), 1.0 / num_classes) if class_probs is None else \
            torch.as_tensor(class_probs, dtype=torch.float64)
        if probs.shape != (num_classes,) or (probs < 0).any() or float(probs.sum()) <= 0:
            raise ValueError(f"class_probs must be {num_classes} non-negative numbers, got {class_probs!r}")
        super().__init__(model, scheduler, sample_shape, config, model_kwargs)
        self.num_classes = num_classes
        self.class_probs = (probs / probs.sum()).float()
        self.class_embeddings = torch.eye(num_classes) if class_embeddings is None else \
            torch.as_tensor(class_embeddings, dtype=torch.float32)
        if self.class_embeddings.dim() != 2 or self.class_embeddings.shape[0] != num_classes:
            raise ValueError(f"class_embeddings must be ({num_classes}, d), got {tuple(self.class_embeddings.shape)}")
        self.condition_dim = int(self.class_embeddings.shape[1])

    def draw_conditions(self, batch_size: int, generator: torch.Generator | None):
        """``batch_size`` labels drawn from ``class_probs`` (a ``(B,)`` long tensor)."""
        return torch.multinomial(self.class_probs, batch_size, replacement=True, generator=generator)

    def set_conditions(self, conditions) -> None:
        if conditions is None:
            raise ValueError("a class-conditional process needs one class label per sample")
        labels = torch.as_tensor(conditions, dtype=torch.long).reshape(-1)
        if ((labels < 0) | (labels >= self.num_classes)).any():
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        device = next(self.model.parameters()).device
        self.model_kwargs["class_labels"] = labels.to(device)  # the sampler passes model_kwargs to every call
        self.current_conditions = labels

    def condition_features(self, conditions=None) -> torch.Tensor:
        labels = self.current_conditions if conditions is None else torch.as_tensor(conditions, dtype=torch.long)
        if labels is None:
            raise RuntimeError("no class labels set: call set_conditions or prepare_batch first")
        device = next(self.model.parameters()).device
        return self.class_embeddings[labels.reshape(-1)].to(device)

    def check_conditions(self, conditions, num_samples: int | None):
        if conditions is None:
            if num_samples is None:
                raise ValueError("pass num_samples or class labels")
            return None, num_samples
        labels = torch.as_tensor(conditions, dtype=torch.long).reshape(-1)
        num_samples = len(labels) if num_samples is None else num_samples
        if num_samples != len(labels):
            raise ValueError(f"num_samples={num_samples} but {len(labels)} class labels were given")
        return labels, num_samples

    def reward_function(self, reward_fn):
        """``x -> reward_fn(x, labels of the current batch)`` (or ``reward_fn(x)``)."""
        process = self

        def reward(x: torch.Tensor) -> torch.Tensor:
            labels = process.current_conditions
            return call_reward(reward_fn, x, None if labels is None else labels.to(x.device))

        reward.__name__ = getattr(reward_fn, "__name__", type(reward_fn).__name__)
        return reward

    @torch.no_grad()
    def oracle_inputs(self, samples: torch.Tensor, conditions, chunk_size: int):
        return samples, conditions

    def save_options(self, directory: str, base_model: str | None = None) -> dict:
        return {"base_model": base_model, "conditional": True, "guidance_scale": None}


__all__ = ["ClassConditionalProcess"]
