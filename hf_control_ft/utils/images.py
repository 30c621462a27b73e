"""Image grids: what a person looks at before and after fine-tuning."""

from __future__ import annotations

import io
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


def video_grid(videos: torch.Tensor, nrow: int | None = None, value_range=(0.0, 1.0)) -> list:
    """``(B, F, 3, H, W)`` videos -> ``F`` PIL grids (frame ``f`` of every video tiled as :func:`image_grid` does)."""
    if videos.ndim != 5:
        raise ValueError(f"video_grid expects (B, F, C, H, W) videos, got shape {tuple(videos.shape)}")
    return [image_grid(videos[:, f], nrow=nrow, value_range=value_range) for f in range(videos.shape[1])]


def save_animation(frames: list, path_or_file, fps: int, format: str = "PNG") -> None:
    """Writes PIL ``frames`` as one looping animation at ``fps`` frames per second: an animated PNG (shown moving
    by browsers and the Hub's model cards; a plain PNG viewer shows the first frame) or a GIF (``format="GIF"``)."""
    frames[0].save(path_or_file, format=format, save_all=True, append_images=frames[1:],
                   duration=max(1, round(1000 / fps)), loop=0)


def to_png(sample: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> bytes:
    """PNG bytes of one sample: ``(3, H, W)`` / ``(1, H, W)`` / ``(H, W)`` images, or a flat ``(D,)`` vector shown as
    a square grey image when ``D`` is a square (else one row); values mapped from ``value_range`` to 0..255."""
    from PIL import Image

    x = sample.detach().float().cpu()
    if x.dim() == 1:
        side = math.isqrt(x.numel())
        x = x.reshape(1, side, side) if side * side == x.numel() else x.reshape(1, 1, -1)
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"cannot show a sample of shape {tuple(sample.shape)} as an image")
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8)
    array = x.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's header (its first 24 bytes), without decoding anything; ``ValueError`` for
    anything that is not a PNG."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def from_png(data: bytes, max_pixels: int | None = None) -> torch.Tensor:
    """``(3, H, W)`` float image in ``[0, 1]`` from PNG bytes; grey and RGBA become RGB.

    ``max_pixels``: refuse (``ValueError``) a PNG whose header announces more pixels, *before* decoding -- a 20 KB
    PNG can announce 13000 x 13000 pixels (484 MiB decoded); a file whose decoded size differs from its header is
    refused too. ``None``: PNG or any format PIL reads, no limit (trusted data only)."""
    from PIL import Image

    if max_pixels is not None:
        width, height = png_size(data)
        if width * height > max_pixels or width < 1 or height < 1:
            raise ValueError(f"a {width}x{height} image is over the limit of {max_pixels} pixels")
    image = Image.open(io.BytesIO(data))
    if max_pixels is not None and (image.format != "PNG" or image.size != (width, height)):
        raise ValueError("not a PNG image")
    image = image.convert("RGB")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(
        image.height, image.width, 3).permute(2, 0, 1).float() / 255.0
