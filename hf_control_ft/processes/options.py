"""Settings of a text-to-image process (``stable_diffusion.json`` of a saved control): guidance, negative prompt,
size, precision, base model, T5 length; ``None`` fields take the family's own defaults (:meth:`for_family`)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import torch

from ..utils.validation import check_field, field_checker, is_int

logger = logging.getLogger(__name__)

DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
KL_PRECISIONS = ("fp32", "upcast", "tf32", "autocast", "delta")


def load_dtype(kl_precision: str, mixed_precision: str | None):
    """``torch_dtype`` for ``from_pretrained``: the dtype the process keeps each frozen module in, so nothing is
    loaded in fp32 only to be cast down (FLUX + T5 in fp32: about 67 GB of host memory at the peak). Under
    ``--mixed_precision fp16 / bf16`` every component in that dtype, but the denoiser in fp32 when the exact KL runs
    on fp32 weights (``--kl_precision fp32``); ``None`` (fp32 everywhere) without mixed precision. The scripts, ``hf-control-ft sample`` / ``evaluate`` and
    ``ControlledTextToImage.from_control`` load with it."""
    half = DTYPES.get(mixed_precision or "no")
    if half is None:
        return None
    denoiser = torch.float32 if kl_precision == "fp32" else half
    return {"default": half, "unet": denoiser, "transformer": denoiser, "transformer_2": denoiser}


@dataclass
class StableDiffusionOptions:
    """Settings of text-conditioned training and inference (saved as ``stable_diffusion.json``).

    ``None`` in ``guidance_scale``, ``negative_prompt`` and ``max_sequence_length`` means the family's own default
    (its diffusers pipeline's: guidance 7.5 for SD 1.x / 2.x, 5.0 SDXL, 7.0 SD3, 3.5 FLUX, 4.0 Qwen-Image
    (``true_cfg_scale``, negative prompt ``" "``), 4.0 FLUX.2 klein, 5.0 Z-Image (``g`` of ``v_c + g (v_c - v_u)``),
    5.0 Wan; text length 256 SD3, 512 the others; Wan 81 frames at 16 fps), filled in by :meth:`for_family` when the
    process is built.

    Attributes:
        guidance_scale: classifier-free guidance weight (``<= 1``: no guidance); FLUX: the guidance embedding.
        negative_prompt: the unconditional prompt of classifier-free guidance (refused by families without it).
        height / width: image size in pixels (multiples of the VAE scale factor, usually 8).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``: dtype of the frozen VAE / text encoder and of
            autocast. LoRA parameters stay fp32.
        kl_precision: ``"fp32"`` (default): UNet weights stay fp32 and every UNet call feeding a KL runs
            without autocast, so the KL matches fp32 training; ``"upcast"``: UNet weights in the half dtype (half
            the memory) and the calls feeding a KL in fp32 arithmetic, each layer upcasting its weight for its own
            call (exact KL of the half-precision model, :mod:`hf_control_ft.processes.upcast`); ``"tf32"``: the
            same with TF32 tensor-core matmuls in those calls and for the whole run on CUDA (fp32 activations;
            several times fp32's speed on tensor-core GPUs, with a KL rounding floor far below ``"autocast"``'s,
            given by ``docs/numerics.md``); ``"autocast"``:
            those calls run in the half dtype too, faster but with a KL rounding floor (module docstring);
            ``"delta"``: half-precision weights and matrix products, fp32 activations, the KL's mean difference
            carried through one pass by difference propagation (:mod:`hf_control_ft.core.difference`): the products
            of ``"autocast"``, with a KL error relative to the KL itself (at most 0.4 % in bf16 on the tiny SD,
            ``docs/numerics.md``) instead of a rounding floor.
        base_model: Hub id or path of the base pipeline (for the model card and for loading).
        prompt_column: column of a ``datasets`` prompt source.
        guidance_rescale: must be 0 (accepted so that diffusers' argument gets a clear error, not a TypeError).
        max_sequence_length: T5 context length of SD3 / FLUX (ignored by SD 1.x / 2.x and SDXL).
        num_frames / fps: video length in frames and its frame rate (video families: Wan; ``None``: the family's
            default, 81 frames at 16 fps; ignored by image families).
        pre_compute_text_embeddings / offload / enable_vae_slicing: memory switches
            (:mod:`hf_control_ft.processes.memory`): per-prompt embeddings cached on the CPU and the text encoders
            off the accelerator; text encoders on the accelerator only while encoding; one-image VAE decodes.
    """

    guidance_scale: float | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    mixed_precision: str = "no"
    kl_precision: str = "fp32"
    base_model: str | None = None
    prompt_column: str = "prompt"
    guidance_rescale: float = 0.0
    max_sequence_length: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    pre_compute_text_embeddings: bool = False
    offload: bool = False
    enable_vae_slicing: bool = False

    def __post_init__(self):
        check = field_checker("StableDiffusionOptions")
        check(self.guidance_scale is None or (isinstance(self.guidance_scale, (int, float))
                                              and self.guidance_scale >= 0), "guidance_scale",
              f"must be a number >= 0, got {self.guidance_scale!r}")
        check(self.negative_prompt is None or isinstance(self.negative_prompt, str), "negative_prompt",
              "must be a string")
        check(self.max_sequence_length is None or is_int(self.max_sequence_length, 1), "max_sequence_length",
              f"must be an int >= 1, got {self.max_sequence_length!r}")
        check(self.num_frames is None or is_int(self.num_frames, 1), "num_frames",
              f"must be an int >= 1, got {self.num_frames!r}")
        check(self.fps is None or is_int(self.fps, 1), "fps", f"must be an int >= 1, got {self.fps!r}")
        check(self.guidance_rescale == 0, "guidance_rescale",
              f"is not supported (got {self.guidance_rescale!r}): rescaling the guided prediction by its standard "
              "deviation makes the transition mean a non-linear function of both branches, which the exact KL "
              "accounting does not cover; use 0")
        check(self.mixed_precision in DTYPES, "mixed_precision",
              f"must be one of {sorted(DTYPES)}, got {self.mixed_precision!r}")
        check(self.kl_precision in KL_PRECISIONS, "kl_precision",
              f"must be one of {KL_PRECISIONS}, got {self.kl_precision!r}")
        for name in ("pre_compute_text_embeddings", "offload", "enable_vae_slicing"):
            check(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, int) and v >= 8 and v % 8 == 0), name,
                  f"must be None or a positive multiple of 8, got {v!r}")

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.mixed_precision]

    def for_family(self, family: str, defaults: dict, negative_prompt: bool = True,
                   guidance_off_at: float = 1.0) -> "StableDiffusionOptions":
        """A copy with every ``None`` of ``defaults``' keys replaced by the family's value. ``negative_prompt=False``
        (a family without classifier-free guidance, e.g. FLUX.1): a non-empty negative prompt is refused, since the
        family would silently ignore it. With classifier-free guidance off (``guidance_scale <= 1``) a negative
        prompt is ignored too (``guidance_scale <= guidance_off_at``: 1 for SD's weight ``w``, 0 for the families whose
        scale is ``w - 1``): one warning says so."""
        values = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **values)
        if not negative_prompt:
            check_field("StableDiffusionOptions", not out.negative_prompt, "negative_prompt",
                        f"the {family} pipeline takes no negative prompt (FLUX.1: no classifier-free guidance; "
                        f"FLUX.2 guides with the empty prompt) and would ignore {out.negative_prompt!r}; leave "
                        "--negative_prompt unset")
        elif out.negative_prompt and out.guidance_scale <= guidance_off_at:
            logger.warning("negative_prompt %r is ignored: guidance_scale %s <= %s turns classifier-free guidance off",
                           out.negative_prompt, out.guidance_scale, guidance_off_at)
        return dataclasses.replace(out, negative_prompt=out.negative_prompt or "") if negative_prompt else out

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "StableDiffusionOptions":
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


__all__ = ["StableDiffusionOptions", "DTYPES", "KL_PRECISIONS", "load_dtype"]
