"""Prompt-conditional rewards on a CLIP model: PickScore and CLIPScore, differentiable in the images.

Both embed the images (``(B, 3, H, W)`` in ``[0, 1]``, resized bicubically to the CLIP resolution and normalised
with the CLIP statistics -- the tensor version of ``CLIPProcessor`` for square images) and the prompts (the
model's tokenizer, padded and truncated to its context length), L2-normalise both and score their cosine:

* :class:`PickScoreReward`: ``exp(logit_scale) * cos`` (Kirstain et al., 2023; the model is a ``CLIPModel``
  fine-tuned on human preferences, ``yuvalkirstain/PickScore_v1``, with the tokenizer of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); about 20-23 for good images;
* :class:`CLIPScoreReward`: ``scale * cos`` with ``scale = 100`` (torchmetrics' convention; Hessel et al. use
  ``2.5 max(cos, 0)``). The clamp at 0 is left out on purpose: it has no gradient where it binds.
"""

from __future__ import annotations

import torch

from .image_rewards import CLIP_MEAN, CLIP_STD, ImageReward, preprocess_for_vision_model

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"


def clip_image_embeddings(model, images: torch.Tensor, image_size: int) -> torch.Tensor:
    """L2-normalised CLIP image embeddings ``(B, D)`` fp32 of ``images`` ``(B, 3, H, W)`` in ``[0, 1]``
    (differentiable); ``model`` is a ``CLIPModel`` or a ``CLIPVisionModelWithProjection``."""
    param = next(model.parameters())
    pixels = preprocess_for_vision_model(images, image_size, CLIP_MEAN, CLIP_STD).to(param.dtype)
    if hasattr(model, "visual_projection"):  # a full CLIPModel: its vision tower and projection
        emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    else:
        emb = model(pixel_values=pixels).image_embeds
    emb = emb.float()
    return emb / emb.norm(dim=-1, keepdim=True)


class _ClipSimilarity(ImageReward):
    """``weight * cos(image, text)`` under a frozen ``transformers.CLIPModel``: ``weight = scale``, or
    ``exp(logit_scale)`` of the model when ``scale`` is None."""

    name = "clip_similarity"

    def __init__(self, model, tokenizer, scale: float | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scale = None if scale is None else float(scale)
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def weight(self) -> torch.Tensor:
        if self.scale is None:
            return self.model.logit_scale.detach().float().exp()
        return torch.tensor(self.scale)

    def similarity(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """Cosine ``(B,)`` between each image and its prompt (one prompt per image)."""
        if prompts is None or isinstance(prompts, str) or len(prompts) != images.shape[0]:
            got = "None" if prompts is None else (repr(prompts) if isinstance(prompts, str) else len(prompts))
            raise ValueError(f"reward {self.__name__!r} is prompt-conditional: pass one prompt per image "
                             f"({images.shape[0]}), got {got}")
        img = clip_image_embeddings(self.model, images, self.image_size)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(img.device)
        text = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        txt = self.model.text_projection(text.pooler_output).float()
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(dim=-1)

    def forward(self, images, prompts=None):
        return self.weight() * self.similarity(images, prompts)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, processor_name_or_path: str | None = None,
                        torch_dtype: torch.dtype | None = None, **hub_kwargs):
        """Loads the ``CLIPModel`` (safetensors only) and the tokenizer (from ``processor_name_or_path``,
        default the model's own repo). ``hub_kwargs`` (``token``, ``revision``, ``cache_dir``) go to both."""
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(model_name_or_path, use_safetensors=True, dtype=torch_dtype, **hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(processor_name_or_path or model_name_or_path, **hub_kwargs)
        return cls(model, tokenizer)


class CLIPImageFeatures(ImageReward):
    """A frozen CLIP image tower as a differentiable embedding ``images (B, 3, H, W) in [0, 1] -> (B, D)``
    (L2-normalised ``image_embeds``, ``D`` = the projection width): the recommended features of SEIKO's reward
    heads on text-to-image models (the optimism bonus is then computed in CLIP space, where a ridge regression on
    a few hundred answers generalises, instead of on pixels).

    Args:
        vision_model: a ``transformers.CLIPVisionModelWithProjection`` (or a ``CLIPModel``, whose vision tower
            and projection are used).
    """

    name = "clip_image_features"

    def __init__(self, vision_model):
        super().__init__()
        self.model = vision_model.eval().requires_grad_(False)
        cfg = vision_model.config
        vision_cfg = getattr(cfg, "vision_config", cfg)
        self.image_size = int(vision_cfg.image_size)
        self.dim = int(getattr(cfg, "projection_dim", None) or vision_cfg.projection_dim)

    def forward(self, images, prompts=None):
        return clip_image_embeddings(self.model, images, self.image_size)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str = CLIPSCORE_MODEL, torch_dtype=None, **hub_kwargs):
        """Loads the image tower (safetensors only) of a CLIP checkpoint."""
        from transformers import CLIPVisionModelWithProjection

        return cls(CLIPVisionModelWithProjection.from_pretrained(model_name_or_path, use_safetensors=True,
                                                                 dtype=torch_dtype, **hub_kwargs))


class PickScoreReward(_ClipSimilarity):
    """PickScore: ``exp(logit_scale) * cos(image, prompt)`` (module docstring)."""

    name = "pickscore"

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, scale=None)


class CLIPScoreReward(_ClipSimilarity):
    """CLIPScore: ``scale * cos(image, prompt)``, ``scale = 100`` by default (module docstring)."""

    name = "clipscore"

    def __init__(self, model, tokenizer, scale: float = 100.0):
        super().__init__(model, tokenizer, scale=scale)


__all__ = ["PickScoreReward", "CLIPScoreReward", "CLIPImageFeatures", "PICKSCORE_MODEL", "PICKSCORE_PROCESSOR",
           "CLIPSCORE_MODEL"]
