"""Settings of the text-to-image scripts per model family, used when neither a flag nor ``--config`` sets them.

The scripts read the base model's ``model_index.json`` (a local file, or one small download) before anything
loads, map its pipeline class to a family and fill every field the user left unset from :data:`PRESETS`; the
log names each value taken. ``examples/text_to_image/<family>.yaml`` hold the same values (a test keeps them
equal) with a reward and an alpha, as starting points to copy.

The values are the scale each family is trained at (its usual resolution, steps and guidance; the batch that fits
one 80 GB GPU with gradient checkpointing, grown by accumulation; stage-1 rollouts and noise batches sized to the
cost of a sample), not tuned results. Every family takes the exact KL at half-precision products
(``kl_precision="delta"``: difference propagation, frozen weights in the ``--mixed_precision`` dtype). The memory
switches are on where the text encoders or the frozen network are large (T5-XXL, a 12B transformer): prompt
embeddings computed once, one-image VAE decodes.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request

logger = logging.getLogger(__name__)

#: pipeline class (``model_index.json``'s ``_class_name``) -> family
PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                   "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "QwenImagePipeline": "qwen-image",
                   "Flux2KleinPipeline": "flux2-klein", "ZImagePipeline": "z-image", "WanPipeline": "wan"}

_COMMON = dict(gradient_checkpointing=True, checkpointing_steps=50, validation_steps=50, kl_precision="delta")
_LARGE = dict(enable_vae_slicing=True, batch_size=1, gradient_accumulation_steps=8)
PRESETS = {
    "sd15": dict(_COMMON, resolution=512, num_inference_steps=50, guidance_scale=7.5, batch_size=4,
                 gradient_accumulation_steps=2, learning_rate=3e-4, lora_rank=8, value_num_rollouts=256,
                 rollout_batch_size=16, noise_batch_size=8, train_steps=500, checkpointing_steps=100,
                 validation_steps=100),
    "sdxl": dict(_COMMON, **_LARGE, resolution=1024, num_inference_steps=40, guidance_scale=5.0, learning_rate=1e-4,
                 lora_rank=16, value_num_rollouts=128, rollout_batch_size=4, noise_batch_size=4, train_steps=300),
    "sd3": dict(_COMMON, **_LARGE, resolution=1024, num_inference_steps=28, guidance_scale=4.5, learning_rate=1e-4,
                lora_rank=16, value_num_rollouts=128, rollout_batch_size=4, noise_batch_size=4, train_steps=300,
                pre_compute_text_embeddings=True),
    "flux": dict(_COMMON, **_LARGE, resolution=1024, num_inference_steps=28, guidance_scale=3.5, learning_rate=1e-4,
                 lora_rank=32, value_num_rollouts=64, rollout_batch_size=2, noise_batch_size=2, train_steps=200,
                 pre_compute_text_embeddings=True),
    "qwen-image": dict(_COMMON, **_LARGE, resolution=1024, num_inference_steps=30, guidance_scale=4.0,
                       learning_rate=1e-4, lora_rank=32, value_num_rollouts=64, rollout_batch_size=2, noise_batch_size=2,
                       train_steps=200, pre_compute_text_embeddings=True),
    "flux2-klein": dict(_COMMON, **_LARGE, resolution=1024, num_inference_steps=28, guidance_scale=4.0,
                        learning_rate=1e-4, lora_rank=32, value_num_rollouts=64, rollout_batch_size=2,
                        noise_batch_size=2, train_steps=200, pre_compute_text_embeddings=True),
    "z-image": dict(_COMMON, **_LARGE, resolution=1024, num_inference_steps=30, guidance_scale=4.0,
                    learning_rate=1e-4, lora_rank=32, value_num_rollouts=64, rollout_batch_size=2, noise_batch_size=2,
                    train_steps=200, pre_compute_text_embeddings=True),
    "wan": dict(_COMMON, **_LARGE, height=480, width=832, num_frames=33, fps=16, num_inference_steps=30,
                guidance_scale=5.0, learning_rate=1e-4, lora_rank=32, value_num_rollouts=32, rollout_batch_size=1,
                noise_batch_size=2, train_steps=100, pre_compute_text_embeddings=True),
}


#: TFLOPs of one denoiser evaluation of each family's published model at its preset size, batch 1, guidance
#: included (``python benchmarks/cost_model.py``, counted on the meta device; ``tests/scripts/test_presets.py``
#: recounts two): what the start-up cost estimate multiplies by the passes of the run
TFLOP_PER_EVALUATION = {"sd15": 1.61, "sdxl": 13.52, "sd3": 22.5, "flux": 74.38, "qwen-image": 138.62,
                        "flux2-klein": 69.64, "z-image": 111.21, "wan": 145.86}


def _model_index(name_or_path: str, revision: str | None, token: str | None, endpoint: str | None) -> dict:
    """``model_index.json`` of a local directory, the Hub cache, or one quick request (5 s, no retries: the
    pipeline's own download, which retries, reports a real connection problem later)."""
    if os.path.isdir(name_or_path):
        with open(os.path.join(name_or_path, "model_index.json"), encoding="utf-8") as fh:
            return json.load(fh)
    from huggingface_hub import constants, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import build_hf_headers

    try:
        with open(hf_hub_download(name_or_path, "model_index.json", revision=revision, local_files_only=True),
                  encoding="utf-8") as fh:
            return json.load(fh)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise
    request = urllib.request.Request(hf_hub_url(name_or_path, "model_index.json", revision=revision, endpoint=endpoint),
                                     headers=build_hf_headers(token=token))
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())


class FamilyLookupError(RuntimeError):
    """The base model's ``model_index.json`` could not be read (offline, gated, private, a slow link)."""


def detect_family(name_or_path: str | None, revision: str | None = None, token: str | None = None,
                  endpoint: str | None = None) -> str | None:
    """The family of a base model from its ``model_index.json`` (local, cached, or fetched alone from the Hub at
    ``endpoint``, default ``HF_ENDPOINT``); ``None`` when it names a pipeline without a preset. Raises
    :class:`FamilyLookupError` when the file cannot be read: the preset must not silently vanish (the library
    defaults -- batch 64, 4096 value rollouts, an fp32 KL -- do not fit a 12B model), so the scripts then ask for
    ``--model_family``."""
    if not name_or_path:
        return None
    try:
        index = _model_index(name_or_path, revision, token, endpoint)
    except Exception as err:  # noqa: BLE001 - offline, gated, private, not a diffusers repo
        raise FamilyLookupError(f"cannot read {name_or_path}'s model_index.json ({type(err).__name__})") from None
    return PIPELINE_FAMILY.get(index.get("_class_name"))


def family_of_pipeline(pipeline) -> str | None:
    """The family of a loaded pipeline (its class), ``None`` for one without a preset."""
    return PIPELINE_FAMILY.get(type(pipeline).__name__)


def preset_values(family: str | None, fields: set[str], explicit: set[str]) -> dict:
    """The preset values of ``family`` for the ``fields`` a script has, except those the user set."""
    if family is None:
        return {}
    return {k: v for k, v in PRESETS[family].items() if k in fields and k not in explicit}


__all__ = ["PIPELINE_FAMILY", "PRESETS", "TFLOP_PER_EVALUATION", "FamilyLookupError", "detect_family", "family_of_pipeline", "preset_values"]
