"""Rewards on videos ``(B, F, 3, H, W)`` in ``[0, 1]`` (the video families' samples, e.g. Wan).

* Any :class:`~hf_control_ft.rewards.image_rewards.ImageReward` (aesthetic, PickScore, CLIPScore, the VLM judge,
  brightness, ...) scores videos frame by frame, reduced by its ``frame_aggregate``; :class:`PerFrameReward` does
  the same for a plain image function ``fn(images, prompts)`` with a chosen reduction.
* :class:`TemporalConsistencyReward`: the mean cosine similarity of consecutive frames' CLIP image embeddings (1:
  every frame looks the same to CLIP), which penalises flicker and scene cuts; mix it with a quality reward
  (``--reward aesthetic:1,temporal_consistency:0.5``), since alone it is maximised by a still video.
* A user's ``fn(videos, prompts)`` (``--reward file.py:function``) receives the videos as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import reward_name
from .clip_rewards import CLIPSCORE_MODEL, CLIPImageFeatures
from .image_rewards import FRAME_AGGREGATES, call_reward, per_frame


def check_videos(videos: torch.Tensor, name: str) -> None:
    """Raises a ``ValueError`` naming the reward unless ``videos`` is a float ``(B, F, 3, H, W)`` tensor."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] != 3 or \
            not videos.is_floating_point():
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"reward {name!r} expects float videos of shape (B, F, 3, H, W) in [0, 1], got {shape}")


class PerFrameReward(nn.Module):
    """An image reward ``fn(images, prompts) -> (B,)`` applied to every frame of a video and reduced over frames
    (``aggregate``: ``"mean"``, ``"min"`` or ``"max"``). Images ``(B, 3, H, W)`` are passed to ``fn`` unchanged."""

    def __init__(self, fn, aggregate: str = "mean"):
        super().__init__()
        if aggregate not in FRAME_AGGREGATES:
            raise ValueError(f"PerFrameReward: aggregate must be one of {FRAME_AGGREGATES}, got {aggregate!r}")
        self.fn, self.aggregate = fn, aggregate
        self.__name__ = f"{aggregate}_over_frames({reward_name(fn)})"

    def forward(self, videos: torch.Tensor, prompts=None) -> torch.Tensor:
        if videos.dim() == 4:
            return call_reward(self.fn, videos, prompts)
        check_videos(videos, self.__name__)
        return per_frame(self.fn, videos, prompts, self.aggregate)


class TemporalConsistencyReward(nn.Module):
    """``mean_f cos(e_f, e_{f+1})`` of consecutive frames' L2-normalised CLIP image embeddings
    (:class:`~hf_control_ft.rewards.clip_rewards.CLIPImageFeatures`) ``(B,)`` (module docstring). ``vision_model``: a
    ``CLIPVisionModelWithProjection`` or a ``CLIPModel``; frozen."""

    name = "temporal_consistency"

    def __init__(self, vision_model):
        super().__init__()
        self.features = CLIPImageFeatures(vision_model)
        self.__name__ = self.name

    def forward(self, videos: torch.Tensor, prompts=None) -> torch.Tensor:
        check_videos(videos, self.name)
        B, num_frames = videos.shape[:2]
        if num_frames < 2:
            raise ValueError(f"reward {self.name!r} needs videos of at least 2 frames, got {num_frames}")
        emb = self.features(videos.flatten(0, 1)).reshape(B, num_frames, -1)
        return (emb[:, 1:] * emb[:, :-1]).sum(-1).mean(1)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str = CLIPSCORE_MODEL, torch_dtype=None, **hub_kwargs):
        """Loads the image tower (safetensors only) of a CLIP checkpoint."""
        return cls(CLIPImageFeatures.from_pretrained(model_name_or_path, torch_dtype=torch_dtype, **hub_kwargs).model)


__all__ = ["PerFrameReward", "TemporalConsistencyReward", "check_videos", "FRAME_AGGREGATES"]
