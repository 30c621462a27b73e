"""Rewards (and oracles) by name or by reference to a user's function, as the training scripts take them.

A *reward spec* is one of

* a built-in name: ``aesthetic`` (LAION aesthetic predictor on CLIP ViT-L/14), ``pickscore``, ``clipscore``,
  ``vlm_judge`` (a vision-language model's probability of answering yes, :mod:`.vlm_judge`; not differentiable),
  ``brightness``, ``saturation``; for videos also ``temporal_consistency`` (:mod:`.video`; the image rewards score
  videos frame by frame);
* ``path/to/file.py:function`` -- a function (or any callable attribute) defined in a Python file;
* ``package.module:function`` -- an importable module's attribute;
* ``http(s)://host[:port]/path`` -- a reward served over HTTP (:mod:`.http`; not differentiable: a SEIKO
  oracle; the token comes from ``$HF_CONTROL_FT_REWARD_TOKEN``);
* a weighted mix of those, ``pickscore:1.0,clipscore:0.5`` or ``aesthetic:1,my_rewards.py:sharpness:0.2``:
  comma-separated terms, each ``spec:weight`` (a term without a number weighs 1); the sum is a
  :class:`~hf_control_ft.rewards.image_rewards.WeightedSumReward`, each term checked and logged on its own.

A user function is called as ``fn(images, prompts)`` (or ``fn(images)``) on images ``(B, 3, H, W)`` in
``[0, 1]`` (videos of the video families: ``(B, F, 3, H, W)``) and returns ``(B,)`` numbers; an oracle (SEIKO) has the same signature and need not be
differentiable. :func:`check_spec` validates a spec without loading any model (the scripts call it before they
load the pipeline), :func:`load_reward` builds the callable.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys

from .http import HTTPReward, is_reward_url
from .video import TemporalConsistencyReward
from .vlm_judge import DEFAULT_VLM, VLMJudgeReward
from .clip_rewards import CLIPSCORE_MODEL, PICKSCORE_MODEL, PICKSCORE_PROCESSOR, CLIPScoreReward, PickScoreReward
from .image_rewards import (
    DEFAULT_CLIP_MODEL,
    WEIGHT_SUFFIXES,
    AestheticReward,
    BrightnessReward,
    SaturationReward,
    WeightedSumReward,
    hub_weights_file,
)

BUILTIN_REWARDS = ("aesthetic", "pickscore", "clipscore", "vlm_judge", "brightness", "saturation",
                   "temporal_consistency")
#: default model of each built-in reward that needs one (``--reward_model_name_or_path`` overrides it)
DEFAULT_MODELS = {"aesthetic": DEFAULT_CLIP_MODEL, "pickscore": PICKSCORE_MODEL, "clipscore": CLIPSCORE_MODEL,
                  "vlm_judge": DEFAULT_VLM, "temporal_consistency": CLIPSCORE_MODEL}
#: a public copy of the LAION improved aesthetic predictor's head (the .pth its authors distribute on GitHub)
AESTHETIC_HEAD_ON_HUB = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"


class RewardSpecError(ValueError):
    """A reward / oracle spec that names nothing loadable (one-line message)."""


#: built-in rewards without a gradient (SEIKO oracles only)
BLACK_BOX_REWARDS = ("vlm_judge",)


def black_box_terms(spec: str) -> list[str]:
    """The terms of ``spec`` (a reward or a weighted mix) that have no gradient: the VLM judge, served URLs. Known
    from the spec alone, before anything loads."""
    terms = mix_terms(spec) if isinstance(spec, str) else None
    names = [t for t, _ in terms] if terms is not None else [spec]
    return [t for t in names if t in BLACK_BOX_REWARDS or is_reward_url(t)]


def mix_terms(spec: str) -> list[tuple[str, float]] | None:
    """``[(term spec, weight), ...]`` of a weighted mix (module docstring), or ``None`` for a single spec without
    a weight. ``"pickscore:1.0,clipscore:0.5"`` -> ``[("pickscore", 1.0), ("clipscore", 0.5)]``."""
    if not isinstance(spec, str):
        return None
    parts = [p.strip() for p in spec.split(",")]
    terms = []
    for part in parts:
        head, sep, tail = part.rpartition(":")
        try:
            weight = float(tail) if sep and head else None
        except ValueError:
            weight = None
        if weight is not None and re.fullmatch(r"https?://[^/]*", head):  # http://host:8000: a port, not a weight
            weight = None
        term = head if weight is not None else part
        if not term:
            raise RewardSpecError(f"{spec!r}: an empty term in the reward mix")
        if weight is not None and weight != weight:  # NaN
            raise RewardSpecError(f"{spec!r}: the weight of {term!r} is not a number")
        terms.append((term, 1.0 if weight is None else weight))
    if len(terms) == 1 and terms[0][0] == spec:
        return None
    names = [t for t, _ in terms]
    if len(set(names)) != len(names):
        raise RewardSpecError(f"{spec!r}: a term appears twice in the reward mix")
    return terms


def _split(spec: str) -> tuple[str, str]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise RewardSpecError(f"{spec!r} is neither a built-in reward {BUILTIN_REWARDS} nor "
                              "'path/to/file.py:function' nor 'package.module:function'")
    return target, attr


_USER_MODULES: dict[tuple, object] = {}  # (absolute path, mtime, size) -> the module imported from that file


def _load_module(target: str, spec: str):
    """The module of ``target``: a user file is imported once per process (checking the flag, loading the
    reward and building the trainer reuse it: its import-time work, e.g. loading a model or connecting to a
    rating service, runs once), again only when the file changed."""
    if target.endswith(".py") or os.sep in target or "/" in target:
        if not os.path.isfile(target):
            raise RewardSpecError(f"reward file {target!r} (from {spec!r}) does not exist")
        stat = os.stat(target)
        key = (os.path.abspath(target), stat.st_mtime_ns, stat.st_size)
        if key in _USER_MODULES:
            return _USER_MODULES[key]
        name = "hf_control_ft_user_" + os.path.splitext(os.path.basename(target))[0]
        module_spec = importlib.util.spec_from_file_location(name, os.path.abspath(target))
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's file failed to import: say which and why
            del sys.modules[name]
            raise RewardSpecError(f"importing {target!r} failed: {type(err).__name__}: {err}") from None
        _USER_MODULES[key] = module
        return module
    try:
        return importlib.import_module(target)
    except ImportError as err:
        raise RewardSpecError(f"cannot import module {target!r} (from {spec!r}): {err}") from None


def load_user_function(spec: str):
    """The callable named by ``file.py:function`` or ``module:function``."""
    target, attr = _split(spec)
    module = _load_module(target, spec)
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise RewardSpecError(f"{target!r} has no {attr!r} (callables there: {public})")
    if not callable(fn):
        raise RewardSpecError(f"{spec!r} is not callable ({type(fn).__name__})")
    if getattr(fn, "__name__", None) is None:
        try:
            fn.__name__ = attr
        except (AttributeError, TypeError):
            pass
    return fn


def check_spec(spec: str, what: str = "reward", aesthetic_head: str | None = None) -> None:
    """Raises :class:`RewardSpecError` unless ``spec`` names a built-in or an existing function; loads no model
    (a user file is imported, which is how its function is found)."""
    if not isinstance(spec, str) or not spec:
        raise RewardSpecError(f"--{what} is required: a built-in name {BUILTIN_REWARDS} or 'file.py:function'")
    terms = mix_terms(spec)
    if terms is not None:
        for term, _ in terms:
            check_spec(term, what, aesthetic_head)
        return
    if is_reward_url(spec):
        try:
            HTTPReward(spec)
        except ValueError as err:
            raise RewardSpecError(str(err)) from None
        return
    if spec in BUILTIN_REWARDS:
        if spec == "aesthetic" and aesthetic_head is None:
            raise RewardSpecError("--reward aesthetic needs --aesthetic_head: the LAION predictor's .pth state dict "
                                  f"(on the Hub: {AESTHETIC_HEAD_ON_HUB}), a .safetensors conversion, "
                                  "or a directory / Hub repo saved with AestheticHead")
        if spec == "aesthetic" and not os.path.exists(aesthetic_head) and aesthetic_head.endswith(
                WEIGHT_SUFFIXES) and hub_weights_file(aesthetic_head) is None:
            raise RewardSpecError(f"--aesthetic_head {aesthetic_head!r} does not exist (a Hub file is written "
                                  "owner/repo/filename)")
        return
    load_user_function(spec)


def load_reward(spec: str, model_name_or_path: str | None = None, processor_name_or_path: str | None = None,
                aesthetic_head: str | None = None, torch_dtype=None, **hub_kwargs):
    """The reward (or oracle) callable named by ``spec`` (module docstring).

    Args:
        model_name_or_path: the CLIP model of ``aesthetic`` / ``pickscore`` / ``clipscore`` (default
            :data:`DEFAULT_MODELS`); a local directory works offline.
        processor_name_or_path: the tokenizer of ``pickscore`` / ``clipscore`` (PickScore's default is the
            LAION ViT-H-14 repo, as its authors load it).
        aesthetic_head: weights of the aesthetic head (``.pth`` / ``.safetensors`` / saved directory, local or on
            the Hub: ``owner/repo/file.pth`` is downloaded with ``huggingface_hub``).
        torch_dtype: dtype of the frozen CLIP model (e.g. ``torch.float16`` on a GPU).
        hub_kwargs: ``token``, ``revision``, ``cache_dir`` for the model downloads.
    """
    check_spec(spec, aesthetic_head=aesthetic_head)
    terms = mix_terms(spec)
    if terms is not None:
        with_model = [t for t, _ in terms if t in DEFAULT_MODELS]
        if (model_name_or_path or processor_name_or_path) and len(with_model) > 1:
            raise RewardSpecError(f"--reward_model_name_or_path / --reward_processor_name_or_path name one model, "
                                  f"but the mix {spec!r} has {len(with_model)} model rewards {with_model}")
        return WeightedSumReward({term: (weight, load_reward(term, model_name_or_path, processor_name_or_path,
                                                              aesthetic_head, torch_dtype, **hub_kwargs))
                                  for term, weight in terms})
    if is_reward_url(spec):
        return HTTPReward(spec)
    model = model_name_or_path or DEFAULT_MODELS.get(spec)
    if spec == "aesthetic":
        return AestheticReward.from_pretrained(aesthetic_head, model, torch_dtype=torch_dtype, **hub_kwargs)
    if spec == "pickscore":
        processor = processor_name_or_path or (PICKSCORE_PROCESSOR if model == PICKSCORE_MODEL else None)
        return PickScoreReward.from_pretrained(model, processor, torch_dtype=torch_dtype, **hub_kwargs)
    if spec == "clipscore":
        return CLIPScoreReward.from_pretrained(model, processor_name_or_path, torch_dtype=torch_dtype, **hub_kwargs)
    if spec == "vlm_judge":
        return VLMJudgeReward.from_pretrained(model, torch_dtype=torch_dtype, **hub_kwargs)
    if spec == "temporal_consistency":
        return TemporalConsistencyReward.from_pretrained(model, torch_dtype=torch_dtype, **hub_kwargs)
    if spec == "brightness":
        return BrightnessReward()
    if spec == "saturation":
        return SaturationReward()
    return load_user_function(spec)


__all__ = ["AESTHETIC_HEAD_ON_HUB", "BUILTIN_REWARDS", "DEFAULT_MODELS", "RewardSpecError", "check_spec", "load_reward",
           "load_user_function", "mix_terms"]
