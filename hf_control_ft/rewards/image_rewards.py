"""Image rewards: ``reward_fn(images, prompts) -> Tensor[B]``.

Convention (every reward here and every reward given to the Stable Diffusion trainer):

* ``images``: float tensor ``(B, 3, H, W)`` in ``[0, 1]`` (NCHW, RGB), usually the differentiable VAE decode;
  grayscale ``(B, 1, H, W)`` is accepted too (converted where a model needs RGB);
* ``prompts``: list of ``B`` strings (or ``None`` for unconditional models); rewards that ignore the text
  accept and ignore it;
* returns ``(B,)`` floats, differentiable with respect to ``images`` wherever the trainer backpropagates
  (ELEGANT always does).

Built-ins: :class:`AestheticReward` (CLIP ViT-L/14 image embedding + MLP head, as the LAION aesthetic
predictor), :class:`ClassifierReward` (log-probability of one class of any ``transformers`` image
classifier), :class:`BrightnessReward` / :class:`SaturationReward` (image statistics for demos) and
:class:`WeightedSumReward`. A plain function works too; :func:`call_reward` calls ``fn(images, prompts)`` or,
for one-argument functions, ``fn(images)``.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .checks import check_reward, reward_name

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def _accepts_prompts(fn) -> bool:
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def call_reward(fn, images: torch.Tensor, prompts=None) -> torch.Tensor:
    """Calls ``fn(images, prompts)``, or ``fn(images)`` when ``fn`` takes a single positional argument."""
    if _accepts_prompts(fn):
        return fn(images, prompts)
    return fn(images)


LUMA = (0.299, 0.587, 0.114)


def check_images(images: torch.Tensor, name: str) -> None:
    """Raises a ``ValueError`` naming the reward unless ``images`` is a float ``(B, 3 or 1, H, W)`` tensor."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward {name!r} expects images of shape (B, 3, H, W) (or (B, 1, H, W)) in [0, 1], "
                         f"got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"reward {name!r} expects float images in [0, 1], got dtype {images.dtype}")


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grayscale -> RGB by repetition, RGB -> grayscale by luma; unchanged when the count already matches."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] == 3 and channels == 1:
        weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
        return torch.einsum("bchw,c->bhw", images, weights).unsqueeze(1)
    raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")


def preprocess_for_vision_model(images: torch.Tensor, size: int | tuple[int, int], mean, std,
                                channels: int = 3) -> torch.Tensor:
    """Differentiable resize (bicubic, antialiased) + normalisation, the tensor version of an image processor.

    ``images`` ``(B, 1 or 3, H, W)`` in ``[0, 1]`` -> ``(B, channels, size, size)`` normalised with
    ``mean`` / ``std`` (one value per output channel).
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = match_channels(images.float(), channels)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)[:, :channels]
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)[:, :channels]
    return (x - m) / s


FRAME_AGGREGATES = ("mean", "min", "max")


def per_frame(fn, videos: torch.Tensor, prompts, aggregate: str = "mean") -> torch.Tensor:
    """An image reward on videos: ``fn`` on every frame of ``videos`` ``(B, F, C, H, W)`` (each frame with its video's
    prompt), ``(B, F)`` scores reduced over frames by ``aggregate`` (``"mean"``, ``"min"``: the worst frame,
    ``"max"``) -> ``(B,)``. Differentiable."""
    if aggregate not in FRAME_AGGREGATES:
        raise ValueError(f"frame aggregate must be one of {FRAME_AGGREGATES}, got {aggregate!r}")
    B, num_frames = videos.shape[:2]
    frames = videos.reshape(B * num_frames, *videos.shape[2:])
    frame_prompts = None if prompts is None else [p for p in prompts for _ in range(num_frames)]
    scores = torch.as_tensor(call_reward(fn, frames, frame_prompts), device=videos.device).reshape(B, num_frames)
    return scores.float().mean(1) if aggregate == "mean" else getattr(scores.float(), aggregate)(1).values


class ImageReward(nn.Module):
    """Base class: ``forward(images, prompts=None) -> (B,)``; ``name`` is used in every error.

    Videos ``(B, F, 3, H, W)`` (the video families' samples) are scored frame by frame and reduced by
    ``frame_aggregate`` (``"mean"`` by default; :func:`per_frame`)."""

    name = "image_reward"
    frame_aggregate = "mean"

    def __init__(self):
        super().__init__()
        self.__name__ = self.name

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() == 5:
            return per_frame(self, images, prompts, self.frame_aggregate)
        check_images(images, self.__name__)
        return super().__call__(images, prompts)


class BrightnessReward(ImageReward):
    """Mean luma ``0.299 R + 0.587 G + 0.114 B`` over pixels (the mean for grayscale), in ``[0, 1]``
    (differentiable; for demos)."""

    name = "brightness"

    def forward(self, images, prompts=None):
        return match_channels(images, 1).flatten(1).mean(dim=1)


class SaturationReward(ImageReward):
    """Mean chroma ``max(R, G, B) - min(R, G, B)`` over pixels, in ``[0, 1]`` (differentiable almost
    everywhere; the HSV saturation without the division by the value, which is unstable near black).
    Zero for grayscale images."""

    name = "saturation"

    def forward(self, images, prompts=None):
        chroma = images.amax(dim=1) - images.amin(dim=1)
        return chroma.flatten(1).mean(dim=1)


class WeightedSumReward(ImageReward):
    """``sum_i w_i * r_i(images, prompts)``; each term is checked and errors name the failing term.

    Args:
        terms: ``{name: (weight, reward)}`` or a list of ``(weight, reward)`` pairs.
    """

    name = "weighted_sum"

    def __init__(self, terms):
        super().__init__()
        items = terms.items() if isinstance(terms, dict) else [(None, t) for t in terms]
        self.names, self.weights, fns = [], [], []
        for key, (weight, fn) in items:
            if not isinstance(weight, (int, float)):
                raise TypeError(f"WeightedSumReward: weight of {key or reward_name(fn)!r} must be a number, got "
                                f"{type(weight).__name__}")
            self.names.append(key or reward_name(fn))
            self.weights.append(float(weight))
            fns.append(fn)
        if not fns:
            raise ValueError("WeightedSumReward needs at least one term")
        self._fns = fns
        self._seen: dict[str, tuple[torch.Tensor, int]] = {}  # per term: (sum of values, count) since the last pop
        self.terms = nn.ModuleList([f for f in fns if isinstance(f, nn.Module)])  # moves with .to()
        self.__name__ = "weighted_sum(" + ", ".join(f"{w:g}*{n}" for w, n in zip(self.weights, self.names)) + ")"

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() == 5:  # videos: each term takes them its own way
            return nn.Module.__call__(self, images, prompts)
        return super().__call__(images, prompts)

    def forward(self, images, prompts=None):
        total = 0.0
        need_grad = torch.is_grad_enabled() and images.requires_grad
        for name, w, fn in zip(self.names, self.weights, self._fns):
            values = check_reward(call_reward(fn, images, prompts), images.shape[0], f"{self.__name__}: {name}",
                                  require_grad=need_grad)
            total_so_far, count = self._seen.get(name, (0.0, 0))
            self._seen[name] = (total_so_far + values.detach().float().sum(), count + values.numel())
            total = total + w * values.float()
        return total

    def items(self) -> list[tuple[str, float, object]]:
        """``[(name, weight, reward), ...]`` of the terms."""
        return list(zip(self.names, self.weights, self._fns))

    def pop_term_means(self) -> dict[str, float]:
        """Mean value of each term (unweighted) over the calls since the last pop; the trainers log them as
        ``train/reward/<name>``."""
        seen, self._seen = self._seen, {}
        return {name: float(total) / count for name, (total, count) in seen.items()}


# ---------------------------------------------------------------------------------------------- aesthetic
class AestheticHead(nn.Module, PyTorchModelHubMixin, library_name="hf_control_ft", tags=["aesthetic-predictor"]):
    """MLP on the L2-normalised CLIP image embedding (the LAION improved aesthetic predictor layout).

    The parameter names (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``) match the
    LAION checkpoint, so its ``.pth`` (or a safetensors conversion) loads with :meth:`from_file`.
    """

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.layers = nn.Sequential(
            nn.Linear(self.embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """``(B, embed_dim)`` normalised embeddings -> ``(B,)`` scores."""
        return self.layers(embeds).squeeze(-1)

    @classmethod
    def from_file(cls, path: str) -> "AestheticHead":
        """Loads a head from a bare state dict: ``.safetensors``, or the LAION ``.pth`` as it is distributed (a
        plain state dict, read with ``torch.load(weights_only=True)``: tensors only, no code is unpickled)."""
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        elif path.endswith((".pth", ".pt", ".bin")):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - anything but a plain tensor dict is refused
                raise ValueError(f"{path} is not a plain state dict loadable with weights_only=True "
                                 f"({type(err).__name__}); convert it to .safetensors") from None
        else:
            raise ValueError(f"aesthetic head weights must be .safetensors or a plain .pth state dict, got {path}")
        if not isinstance(state, dict) or "layers.0.weight" not in state:
            keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} is not an aesthetic head state dict: no 'layers.0.weight' among {keys}")
        head = cls(embed_dim=state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def hub_weights_file(spec: str) -> tuple[str, str] | None:
    """``(repo_id, filename)`` when ``spec`` names a weights file inside a Hub repo (``owner/repo/file.pth``,
    ``owner/repo/sub/file.safetensors``) and no such local file exists; ``None`` otherwise."""
    if not isinstance(spec, str) or not spec.endswith(WEIGHT_SUFFIXES) or os.path.exists(spec):
        return None
    parts = spec.split("/")
    if len(parts) < 3 or spec.startswith(("/", ".", "~")) or not all(parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


class AestheticReward(ImageReward):
    """Aesthetic score: CLIP image embedding (ViT-L/14 by default), L2-normalised, through an MLP head.

    Differentiable end to end (tensor preprocessing: bicubic resize to the CLIP resolution, CLIP
    normalisation). The vision tower and head are frozen and put in eval mode.

    Args:
        vision_model: a ``transformers.CLIPVisionModelWithProjection``.
        head: an :class:`AestheticHead` whose ``embed_dim`` equals ``vision_model.config.projection_dim``.
    """

    name = "aesthetic"

    def __init__(self, vision_model, head: AestheticHead):
        super().__init__()
        proj = getattr(vision_model.config, "projection_dim", None)
        if proj is not None and proj != head.embed_dim:
            raise ValueError(f"aesthetic head expects {head.embed_dim}-dim embeddings but the CLIP model projects "
                             f"to {proj}")
        self.vision_model = vision_model.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.image_size = int(vision_model.config.image_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess_for_vision_model(images, self.image_size, CLIP_MEAN, CLIP_STD)
        dtype = next(self.vision_model.parameters()).dtype
        emb = self.vision_model(pixel_values=pixels.to(dtype)).image_embeds.float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def forward(self, images, prompts=None):
        return self.head(self.embed(images).to(next(self.head.parameters()).dtype)).float()

    @classmethod
    def from_pretrained(cls, head_name_or_path: str, clip_model_name_or_path: str = DEFAULT_CLIP_MODEL,
                        torch_dtype: torch.dtype | None = None, **hub_kwargs) -> "AestheticReward":
        """Loads the head and the CLIP vision tower (safetensors only). The head is a directory / Hub repo saved
        with ``AestheticHead.save_pretrained``, a bare ``.safetensors`` file or the LAION ``.pth`` state dict,
        local or a file in a Hub repo (``owner/repo/path/file.pth``, :func:`hub_weights_file`; e.g.
        ``camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth``). ``hub_kwargs``
        (``token``, ``revision``, ``cache_dir``, ...) go to both loaders."""
        from transformers import CLIPVisionModelWithProjection

        endpoint = hub_kwargs.pop("endpoint", None)  # the head's Hub only (tests: an in-process Hub)
        hub_file = hub_weights_file(head_name_or_path)
        if hub_file is not None:
            from huggingface_hub import hf_hub_download

            keys = ("token", "revision", "cache_dir", "local_files_only")
            head_name_or_path = hf_hub_download(*hub_file, endpoint=endpoint,
                                                **{k: v for k, v in hub_kwargs.items() if k in keys})
        if os.path.isfile(head_name_or_path):
            head = AestheticHead.from_file(head_name_or_path)
        else:
            head = AestheticHead.from_pretrained(head_name_or_path, **hub_kwargs)
        vision = CLIPVisionModelWithProjection.from_pretrained(clip_model_name_or_path, use_safetensors=True,
                                                               dtype=torch_dtype, **hub_kwargs)
        return cls(vision, head)


# --------------------------------------------------------------------------------------------- classifier
class ClassifierReward(ImageReward):
    """``log p(class | image)`` under any ``transformers`` image classifier (``...ForImageClassification``).

    Args:
        model: the classifier; called as ``model(pixel_values=...)`` and must return ``.logits`` ``(B, C)``.
        target: class index or label (looked up in ``model.config.label2id``).
        image_size: resolution the model expects (default: ``model.config.image_size``).
        image_mean / image_std: normalisation (default: those of ``image_processor``, else ImageNet's 0.5).
        image_processor: optional processor to read ``size`` / ``image_mean`` / ``image_std`` from.
    """

    name = "classifier"

    def __init__(self, model, target, image_size=None, image_mean=None, image_std=None, image_processor=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        if isinstance(target, str):
            label2id = getattr(cfg, "label2id", None) or {}
            if target not in label2id:
                raise ValueError(f"class label {target!r} is not in the classifier's labels "
                                 f"{sorted(label2id)[:20]}")
            target = int(label2id[target])
        num_labels = getattr(cfg, "num_labels", None)
        if not isinstance(target, int) or target < 0 or (num_labels is not None and target >= num_labels):
            raise ValueError(f"class index must be an int in [0, {num_labels}), got {target!r}")
        self.target = target
        if image_processor is not None:
            size = getattr(image_processor, "size", None) or {}
            if image_size is None and isinstance(size, dict):
                image_size = size.get("shortest_edge") or (size.get("height"), size.get("width"))
            image_mean = image_mean or getattr(image_processor, "image_mean", None)
            image_std = image_std or getattr(image_processor, "image_std", None)
        self.image_size = image_size or getattr(cfg, "image_size", None)
        if self.image_size is None:
            raise ValueError("ClassifierReward: pass image_size (the classifier config has none)")
        self.num_channels = int(getattr(cfg, "num_channels", 3) or 3)
        self.image_mean = tuple(image_mean or (0.5,) * self.num_channels)
        self.image_std = tuple(image_std or (0.5,) * self.num_channels)
        label = (getattr(cfg, "id2label", None) or {}).get(target, str(target))
        self.__name__ = f"classifier_logprob[{label}]"

    def forward(self, images, prompts=None):
        pixels = preprocess_for_vision_model(images, self.image_size, self.image_mean, self.image_std,
                                             channels=self.num_channels)
        dtype = next(self.model.parameters()).dtype
        logits = self.model(pixel_values=pixels.to(dtype)).logits.float()
        return torch.log_softmax(logits, dim=-1)[:, self.target]

    @classmethod
    def from_pretrained(cls, name_or_path: str, target, **hub_kwargs) -> "ClassifierReward":
        """Loads ``AutoModelForImageClassification`` (safetensors only) and its image processor if present."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(name_or_path, use_safetensors=True, **hub_kwargs)
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path, **hub_kwargs)
        except (OSError, ValueError):
            processor = None
        return cls(model, target, image_processor=processor)

