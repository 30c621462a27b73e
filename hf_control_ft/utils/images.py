"""Image grids: what a person looks at before and after fine-tuning."""

from __future__ import annotations

import math

import torch


def image_grid(samples: torch.Tensor, nrow: int | None = None, scale: int = 1, value_range=(-1.0, 1.0),
               pad: int = 1):
    """A PIL image tiling ``(B, C, H, W)`` samples (``C`` = 1 grey or 3 RGB) in ``value_range``, ``nrow`` per row,
    each pixel drawn ``scale x scale`` (nearest neighbour), separated by ``pad`` white pixels."""
    from PIL import Image

    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"image_grid expects (B, 1 or 3, H, W) samples, got shape {tuple(samples.shape)}")
    lo, hi = value_range
    x = ((samples.detach().float().cpu().clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)
    b, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    canvas = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, top:top + h, left:left + w] = x[i]
    array = canvas[0].numpy() if c == 1 else canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(array, mode="L" if c == 1 else "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
