"""Image features for the SEIKO reward heads on Stable Diffusion latents.

The reward ensemble regresses oracle values on ``image_features(decode(latent))``: a pluggable differentiable
image embedding (a frozen CLIP / DINO image tower for real runs; :class:`PooledPixelFeatures` by default). The
optimistic reward is therefore differentiable back to the latents through the VAE decoder, which is what the
drift update backpropagates. The embedding is prompt-agnostic; for prompt-dependent oracles pass a feature
extractor whose embedding captures what the oracle rewards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PooledPixelFeatures(nn.Module):
    """Images ``(B, 3, H, W)`` -> per-channel average over a ``size x size`` grid, ``(B, 3 * size^2)``.

    A parameter-free, differentiable default embedding for the reward heads (colour layout at low resolution).
    Real runs should pass a pretrained image encoder instead.
    """

    def __init__(self, size: int = 4):
        super().__init__()
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"PooledPixelFeatures.size must be an int >= 1, got {size!r}")
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)``, or videos ``(B, F, 3, H, W)`` (every frame pooled: ``(B, F * 3 * size^2)``)."""
        return F.adaptive_avg_pool2d(images.flatten(0, -4), self.size).reshape(images.shape[0], -1)


class LatentFeatures:
    """``latents (B, *sample_shape) -> image_features(decode(latents)) (B, D)``, differentiable in the latents;
    ``decode`` is the family's (:meth:`StableDiffusionProcess.decode`).

    Without autograd (fitting the heads, the Gram matrix, metrics over the whole feedback dataset) the latents
    are decoded in chunks of ``chunk_size`` to bound the VAE's activation memory.
    """

    def __init__(self, decode, image_features, chunk_size: int = 8):
        self.decode, self.image_features, self.chunk_size = decode, image_features, int(chunk_size)

    def _one(self, latents: torch.Tensor) -> torch.Tensor:
        features = self.image_features(self.decode(latents))
        if features.ndim != 2 or features.shape[0] != latents.shape[0]:
            raise ValueError(f"the feature extractor must return (B, D) features, got {tuple(features.shape)} "
                             f"for B={latents.shape[0]}")
        return features.float()

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or latents.shape[0] <= self.chunk_size:
            return self._one(latents)
        return torch.cat([self._one(chunk) for chunk in latents.split(self.chunk_size)])
