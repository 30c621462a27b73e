"""Command-line arguments of the text-to-image training scripts, in diffusers' names.

``examples/text_to_image/train_elegant.py`` takes :class:`ElegantScriptArguments` + every
:class:`~hf_control_ft.ElegantConfig` field; ``train_seiko.py`` takes :class:`SeikoScriptArguments` + every
:class:`~hf_control_ft.SeikoConfig` field. :func:`parse_script_args` parses both from flags and ``--config``
YAML and turns every problem into one line on stderr and exit status 2, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from ..processes.options import KL_PRECISIONS
from ..rewards.registry import RewardSpecError, black_box_terms, check_spec
from ..serialization.checkpoints import PREFIX as CHECKPOINT_PREFIX
from ..serialization.checkpoints import finished_model_files, list_checkpoints
from ..serialization.saved import is_hub_id
from ..trainers.base import check_trackers
from ..utils.config_cli import ConfigCliError, explicit_fields, parse_dataclasses
from ..utils.errors import exit_with_error
from ..utils.validation import field_checker, is_int
from .presets import PRESETS, FamilyLookupError, detect_family, preset_values

#: image encoder of the SEIKO reward heads by default (``--feature_model_name_or_path``); ``"pixels"`` opts out
DEFAULT_FEATURE_MODEL = "openai/clip-vit-large-patch14"
PIXEL_FEATURES = "pixels"


def _f(default=None, help_text: str = "", aliases: tuple = (), **kw):
    metadata = {"help": help_text, "aliases": tuple(aliases)}  # aliases: diffusers' names of the same flag
    if isinstance(default, list):  # a fresh list per instance
        return field(default_factory=lambda: list(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class TextToImageArguments:
    """The base model, the prompts, validation, the Hub and precision: what is not an algorithm setting."""

    pretrained_model_name_or_path: str | None = _f(None, "Hub id or local directory of the base diffusers "
                                                         "pipeline (the pipeline class is read from it)")
    model_family: str | None = _f(None, "the base model's family, whose preset fills unset flags: " +
                                  ", ".join(PRESETS) + ", or 'none' (the library defaults); default: read from "
                                  "the model's model_index.json (needed when that cannot be read: offline, gated)")
    revision: str | None = _f(None, "revision (branch, tag or commit) of the base model on the Hub")
    variant: str | None = _f(None, "weights variant of the base model, e.g. 'fp16'")
    prompts: list[str] | None = _f(None, "training prompts given on the command line")
    prompts_file: str | None = _f(None, "text file with one training prompt per line")
    dataset_name: str | None = _f(None, "datasets name (Hub id, local dataset directory or data files) of the "
                                        "training prompts")
    dataset_config_name: str | None = _f(None, "configuration of dataset_name")
    dataset_split: str = _f("train", "split of dataset_name")
    prompt_column: str = _f("prompt", "column of dataset_name that holds the prompts", aliases=("caption_column",))
    resolution: int | None = _f(None, "image height and width in pixels (default: the model's)")
    height: int | None = _f(None, "image / video height in pixels (default: --resolution, else the model's)")
    width: int | None = _f(None, "image / video width in pixels (default: --resolution, else the model's)")
    num_frames: int | None = _f(None, "video families (Wan): frames per video, 4k + 1 (default: the pipeline's 81)")
    fps: int | None = _f(None, "video families: frame rate of the saved and logged videos (default: 16)")
    guidance_scale: float | None = _f(None, "guidance scale of training and validation: classifier-free (<= 1: "
                                            "none), FLUX's guidance embedding (default: the family pipeline's: "
                                            "SD 7.5, SDXL 5.0, SD3 7.0, FLUX 3.5, Qwen-Image 4.0 (true_cfg_scale), "
                                            "FLUX.2 klein 4.0, Z-Image 5.0 (CFG weight minus 1), Wan 5.0)")
    negative_prompt: str | None = _f(None, "negative prompt of classifier-free guidance (refused for FLUX, which "
                                           "has none)")
    max_sequence_length: int | None = _f(None, "SD3 / FLUX / Qwen-Image / FLUX.2 / Z-Image / Wan: text context "
                                               "length of the prompt embeddings (default: the pipeline's: SD3 256, "
                                               "others 512)")
    without_text_encoder_3: bool = _f(False, "SD3: load the pipeline without its T5 encoder (text_encoder_3=None; "
                                             "zero T5 embeddings, as diffusers does)")
    validation_prompt: list[str] | None = _f(None, "prompts of the validation images (default: the first training "
                                                   "prompt)")
    num_validation_images: int = _f(4, "validation images per validation prompt")
    validation_steps: int = _f(100, "validation images every N drift steps (SEIKO: every round) and at the end; "
                                    "0: at the end only")
    resume_from_checkpoint: str | None = _f(None, "'latest', 'checkpoint-N' or a checkpoint path")
    push_to_hub: bool = _f(False, "push the adapter, initial noise, card and validation grid to the Hub")
    hub_model_id: str | None = _f(None, "Hub repo to push to (default: the output directory's name)")
    hub_token: str | None = _f(None, "Hub token (never logged or written; default: the cached login)",
                               repr=False)
    hub_private_repo: bool = _f(False, "create the Hub repo private")
    base_model_id: str | None = _f(None, "Hub id of the base model for the model card when "
                                         "pretrained_model_name_or_path is a local copy")
    mixed_precision: str | None = _f(None, "'no', 'fp16' or 'bf16' (default: what accelerate launch sets)")
    kl_precision: str = _f("fp32", "'fp32': fp32 network weights, calls that feed the KL in fp32 (exact KL); "
                                   "'upcast': weights in the --mixed_precision dtype (half the memory), calls that"
                                   " feed the KL in fp32 arithmetic layer by layer (exact KL); 'tf32': the same "
                                   "with TF32 tensor-core matmuls there (GPU); 'autocast': half "
                                   "precision, faster, with a KL rounding floor; 'delta': half-precision "
                                   "weights and products, the KL's difference carried through one pass (autocast's "
                                   "products, error relative to the KL)")
    pre_compute_text_embeddings: bool = _f(False, "encode each prompt once, keep the embeddings on the CPU and the "
                                                  "text encoders off the accelerator")
    offload: bool = _f(False, "keep the text encoders (and a SEIKO oracle that is a model) on the CPU, on the "
                                     "accelerator only while encoding (answering)")
    enable_vae_slicing: bool = _f(False, "decode one image at a time for the reward and the oracle")
    allow_tf32: bool = _f(False, "TF32 matmuls on Ampere+ GPUs, except in the network calls that feed a KL")
    tracker_init_kwargs: str | None = _f(None, "JSON object passed to the trackers, e.g. "
                                               "'{\"wandb\": {\"entity\": \"me\"}}'")
    reward_model_name_or_path: str | None = _f(None, "CLIP model of a built-in reward / oracle (default: the "
                                                     "reward's published model)")
    reward_processor_name_or_path: str | None = _f(None, "tokenizer of pickscore / clipscore (default: the "
                                                         "reward's published one)")
    aesthetic_head: str | None = _f(None, "aesthetic predictor weights: the LAION .pth, a .safetensors or a "
                                          "saved AestheticHead directory")

    def __post_init__(self):
        check = field_checker(type(self).__name__)
        check(bool(self.pretrained_model_name_or_path), "pretrained_model_name_or_path",
              "is required: the base model, a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a local "
              "diffusers pipeline directory")
        check(self.model_family in (None, "none", *PRESETS), "model_family",
              f"must be one of {', '.join(PRESETS)} or 'none', got {self.model_family!r}")
        sources = [n for n in ("prompts", "prompts_file", "dataset_name") if getattr(self, n)]
        check(len(sources) == 1, "prompts", f"give exactly one prompt source (--prompts, --prompts_file or "
              f"--dataset_name), got {sources or 'none'}")
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if isinstance(self.validation_prompt, str):
            self.validation_prompt = [self.validation_prompt]
        check(self.resolution is None or (is_int(self.resolution, 8) and self.resolution % 8 == 0), "resolution",
              f"must be a positive multiple of 8, got {self.resolution!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            check(value is None or (is_int(value, 8) and value % 8 == 0), name,
                  f"must be a positive multiple of 8, got {value!r}")
        for name in ("num_frames", "fps"):
            check(getattr(self, name) is None or is_int(getattr(self, name), 1), name,
                  f"must be an int >= 1, got {getattr(self, name)!r}")
        check(self.max_sequence_length is None or is_int(self.max_sequence_length, 1), "max_sequence_length",
              f"must be an int >= 1, got {self.max_sequence_length!r}")
        check(is_int(self.num_validation_images, 1), "num_validation_images",
              f"must be an int >= 1, got {self.num_validation_images!r}")
        check(is_int(self.validation_steps, 0), "validation_steps",
              f"must be an int >= 0, got {self.validation_steps!r}")
        check(self.mixed_precision in (None, "no", "fp16", "bf16"), "mixed_precision",
              f"must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        check(self.kl_precision in KL_PRECISIONS, "kl_precision",
              f"must be one of {', '.join(repr(k) for k in KL_PRECISIONS)}, got {self.kl_precision!r}")
        check(self.guidance_scale is None or (isinstance(self.guidance_scale, (int, float))
                                              and self.guidance_scale >= 0), "guidance_scale",
              f"must be a number >= 0, got {self.guidance_scale!r}")
        if self.tracker_init_kwargs is not None:
            try:
                kwargs = json.loads(self.tracker_init_kwargs)
            except (TypeError, json.JSONDecodeError):
                kwargs = None
            check(isinstance(kwargs, dict), "tracker_init_kwargs",
                  f"must be a JSON object, got {self.tracker_init_kwargs!r}")
        r = self.resume_from_checkpoint
        check(r is None or (isinstance(r, str) and (r == "latest" or r.startswith(CHECKPOINT_PREFIX)
                                                    or os.path.isdir(r))),
              "resume_from_checkpoint", f"must be 'latest', 'checkpoint-N' or an existing directory, got {r!r}")

    def init_kwargs(self) -> dict:
        return json.loads(self.tracker_init_kwargs) if self.tracker_init_kwargs else {}

    def check_before_loading(self, config) -> None:
        """Checks what can be checked without loading a model (raises ``ValueError`` naming the flag); ``config``
        is the run's ``ElegantConfig`` / ``SeikoConfig``."""
        check = field_checker(type(self).__name__)
        check(bool(self.pretrained_model_name_or_path), "pretrained_model_name_or_path",
              "is required (a Hub id or a local diffusers pipeline directory)")
        if self.prompts_file:
            try:
                with open(self.prompts_file, encoding="utf-8") as fh:
                    lines = [line.strip() for line in fh if line.strip()]
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"--prompts_file {self.prompts_file!r} cannot be read: "
                                 f"{getattr(err, 'strerror', None) or err}") from None
            check(bool(lines), "prompts_file", f"{self.prompts_file!r} holds no prompt")
        self.check_output_dir(config.output_dir, config.overwrite_output_dir)
        if self.push_to_hub and not self.hub_model_id:
            self.hub_model_id = os.path.basename(os.path.normpath(config.output_dir or "model"))

    #: whether a second run on a finished ``output_dir`` is refused (ELEGANT) or resumes it (SEIKO)
    refuses_existing_run = True

    def check_output_dir(self, output_dir: str | None, overwrite: bool) -> None:
        """A new run never overwrites an old one silently: ``output_dir`` holding checkpoints or a saved model
        needs ``--resume_from_checkpoint`` (checkpoints) or ``--overwrite_output_dir``; a finished model without
        checkpoints cannot be resumed (that would train it again and overwrite it)."""
        if not self.refuses_existing_run or not output_dir or overwrite:
            return
        checkpoints = [os.path.basename(p) for _, p in list_checkpoints(output_dir)]
        finished = finished_model_files(output_dir)
        if self.resume_from_checkpoint and (checkpoints or not finished):
            return
        if checkpoints:
            raise ValueError(f"--output_dir {output_dir!r} already holds a run ({', '.join(checkpoints + finished)})"
                             ": pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to start "
                             "over, or another --output_dir")
        if finished:
            why = (f" (--resume_from_checkpoint {self.resume_from_checkpoint} would train it again from the start "
                   "and overwrite it)" if self.resume_from_checkpoint else "")
            raise ValueError(f"--output_dir {output_dir!r} already holds a finished model ({', '.join(finished)}) "
                             f"and no checkpoint to continue it from{why}: pass --overwrite_output_dir to replace "
                             "it, or another --output_dir")

    def base_model(self) -> str | None:
        """The base model a save records: ``base_model_id`` (a Hub id), else ``pretrained_model_name_or_path``
        unless it is a path of this machine (``None``: a published file never names a local path; the card shows
        a local path by its directory name)."""
        if self.base_model_id:
            return self.base_model_id
        path = self.pretrained_model_name_or_path
        return None if os.path.exists(path) or not is_hub_id(path) else path

    def card_dataset(self) -> str | None:
        """The prompt dataset as a card names it: a Hub id as given, a local directory by its name only."""
        name = self.dataset_name
        return os.path.basename(os.path.normpath(name)) if name and os.path.isdir(name) else name


@dataclass
class ElegantScriptArguments(TextToImageArguments):
    reward: str | None = _f(None, "the reward: a built-in name (aesthetic, pickscore, clipscore, brightness, "
                                  "saturation), 'path/to/file.py:function' or 'package.module:function'")

    def __post_init__(self):
        super().__post_init__()
        black_box = black_box_terms(self.reward) if self.reward else []
        if black_box:  # known from the spec: refused before a 3B judge is downloaded or a model is looked up
            raise ValueError(f"--reward {self.reward}: {black_box[0]} has no gradient with respect to the images, and "
                             "ELEGANT backpropagates through the reward; a black-box reward (a VLM judge, a served "
                             f"model, people) is SEIKO's case: train_seiko.py --oracle {black_box[0]} --num_rounds 4 "
                             "--queries_per_round 1024 (docs/seiko.md)")

    def check_before_loading(self, config) -> None:
        super().check_before_loading(config)
        check_spec(self.reward, "reward", aesthetic_head=self.aesthetic_head)


@dataclass
class SeikoScriptArguments(TextToImageArguments):
    oracle: str | None = _f(None, "the oracle (the expensive true reward): a built-in name, 'path/to/file.py:"
                                  "function', 'package.module:function' (called as fn(images, prompts)), or "
                                  "'human': people rate the images on a web page the trainer serves")
    raters: list[str] | None = _f(None, "--oracle human: rater names (each new one gets a login link in "
                                  "OUTPUT_DIR/ratings/logins/NAME.url)")
    rating_host: str = _f("127.0.0.1", "--oracle human: interface of the rating page (default: this machine only)")
    rating_port: int = _f(7860, "--oracle human: port of the rating page")
    ratings_per_query: int = _f(1, "--oracle human: ratings averaged per query, each by a different rater")
    rating_scale: list[float] = _f([1.0, 10.0, 1.0], "--oracle human: minimum, maximum and step of the scale")
    rating_mode: str = _f("score", "--oracle human: 'score' (one image, a value on the scale) or 'pairwise' (two "
                                   "images, which is better; Bradley-Terry values)")
    feedback_dataset_id: str | None = _f(None, "with --push_to_hub: also push the feedback dataset to this "
                                               "dataset repo")
    feature_model_name_or_path: str = _f(DEFAULT_FEATURE_MODEL, "CLIP model (Hub id or local path) whose "
                                         "normalised image embeddings the reward heads and the optimism bonus use; "
                                         "'pixels': 4x4 pooled pixels instead (no download, weaker)")

    refuses_existing_run = False  # the run state in output_dir is resumed: no oracle answer is ever asked twice

    def check_before_loading(self, config) -> None:
        super().check_before_loading(config)
        field_checker(type(self).__name__)(self.resume_from_checkpoint in (None, "latest"), "resume_from_checkpoint",
                                           "SEIKO always resumes from the state in output_dir (every oracle answer "
                                           f"and finished round is kept there); got {self.resume_from_checkpoint!r}")
        if self.oracle == "human":
            check = field_checker(type(self).__name__)
            check(bool(self.raters), "raters", "--oracle human needs at least one rater name (--raters alice bob)")
            check(isinstance(self.rating_scale, list) and len(self.rating_scale) == 3, "rating_scale",
                  f"takes three numbers (minimum maximum step), got {self.rating_scale!r}")
            check(self.rating_mode in ("score", "pairwise"), "rating_mode",
                  f"must be 'score' or 'pairwise', got {self.rating_mode!r}")
            check(isinstance(self.ratings_per_query, int) and self.ratings_per_query >= 1, "ratings_per_query",
                  f"must be an int >= 1, got {self.ratings_per_query!r}")
        else:
            check_spec(self.oracle, "oracle", aesthetic_head=self.aesthetic_head)


def apply_family_preset(args, config, explicit: set[str]):
    """``(args, config)`` with the base model's family preset (:mod:`.presets`) in every field the user left
    unset; each value taken is logged. Validation runs again on the new values."""
    if args.model_family is not None:
        family = None if args.model_family == "none" else args.model_family
    else:
        try:
            family = detect_family(args.pretrained_model_name_or_path, args.revision, args.hub_token)
        except FamilyLookupError as err:
            raise ValueError(f"--model_family: {err}, so its family preset (batch, steps, stage-1 rollouts, memory "
                             "switches, KL precision) cannot be chosen, and the library defaults (batch 64, 4096 "
                             "value rollouts, an fp32 KL) do not fit a real model: pass --model_family "
                             f"({', '.join(PRESETS)}), or --model_family none for those defaults") from None
    changes = [preset_values(family, {f.name for f in dataclasses.fields(obj)}, explicit) for obj in (args, config)]
    args, config = dataclasses.replace(args, **changes[0]), dataclasses.replace(config, **changes[1])
    args.preset_family = family  # checked against the loaded pipeline (scripts/text_to_image.py)
    taken = ", ".join(f"--{k} {v}" for c in changes for k, v in sorted(c.items()))
    args.preset_note = f"{family} preset (flags and --config override it): {taken}" if taken else None
    return args, config


def parse_script_args(args_cls, config_cls, argv=None, prog: str | None = None, description: str | None = None):
    """``(args, config)`` from flags and ``--config``; any problem exits with status 2 and one line
    (``error: ...``) before a model is loaded. Defaults: ``output_dir`` = ``<family>-model`` style name,
    ``logging_dir`` = ``<output_dir>/logs``."""
    try:
        args, config = parse_dataclasses((args_cls, config_cls), argv, prog=prog, description=description)
        args, config = apply_family_preset(args, config, explicit_fields((args_cls, config_cls), argv))
        check_trackers(config.report_to)
        if config.output_dir is None:
            config.output_dir = "elegant-model"
        if config.logging_dir is None:
            config.logging_dir = os.path.join(config.output_dir, "logs")
        args.check_before_loading(config)
    except (ConfigCliError, RewardSpecError, ValueError) as err:
        exit_with_error(as_flag(str(err)), status=2)
    return args, config


_FIELD_ERROR = re.compile(r"^(?:ElegantScriptArguments|SeikoScriptArguments|TextToImageArguments|ElegantConfig|"
                          r"SeikoConfig|StableDiffusionOptions)\.(\w+): ")


def as_flag(message: str, fields=None) -> str:
    """``"ElegantConfig.alpha: must be ..."`` -> ``"--alpha: must be ..."``: a script's errors name the flag the user
    typed (or the YAML key of the same name), not a class of the library. With ``fields`` (the flag names) the Python
    spellings of the library's run-time errors become flags too: ``overwrite_output_dir=True`` ->
    ``--overwrite_output_dir``, ``oracle_max_attempts=3`` -> ``--oracle_max_attempts 3``, ``give num_rounds >= 4``
    -> ``give --num_rounds 4 or more``, ``ElegantConfig.drift_objective:`` anywhere -> ``--drift_objective:``."""
    message = _FIELD_ERROR.sub(lambda m: f"--{m.group(1)}: ", message)
    message = re.sub(r"\b(?:ElegantConfig|SeikoConfig)\.(\w+)", r"--\1", message)
    if not fields:
        return message
    names = "|".join(sorted(map(re.escape, fields), key=len, reverse=True))
    message = re.sub(rf"(?<![-\w])({names})=True\b", r"--\1", message)
    message = re.sub(rf"(?<![-\w])({names})=False\b", r"--no_\1", message)
    message = re.sub(rf"(?<![-\w])({names}) >= (\d+)", r"--\1 \2 or more", message)
    return re.sub(rf"(?<![-\w])({names})=([^\s,;)]+)", r"--\1 \2", message)


def flag_names(*classes) -> set[str]:
    """Every flag of the scripts' dataclasses (for :func:`as_flag`)."""
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


__all__ = ["TextToImageArguments", "ElegantScriptArguments", "SeikoScriptArguments", "parse_script_args"]
