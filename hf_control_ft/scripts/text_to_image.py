"""The text-to-image training scripts: ELEGANT (:func:`run_elegant`) and SEIKO (:func:`run_seiko`).

Both follow one path: parse and check every flag (one-line error, exit status 2, before a model is loaded) ->
``Accelerator`` (trackers, ``--mixed_precision`` or accelerate's own setting) -> the base pipeline
(``DiffusionPipeline.from_pretrained``: the class comes from the checkpoint; unsupported classes are refused by
:func:`hf_control_ft.processes.process_from_pipeline`) -> prompts -> reward / oracle -> trainer -> the network
evaluations each stage will cost (printed and logged) -> training with validation images -> the saved adapter,
initial noise, model card and validation grid in ``output_dir`` -> optionally the Hub.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import torch
from accelerate import Accelerator

from ..feedback.oracle import OracleOutputError, OracleUnavailableError
from ..feedback.human_oracle import HumanOracle
from ..feedback.rating import RatingScale
from ..processes.loading import load_base_pipeline
from ..processes.options import DTYPES, load_dtype
from ..rewards.clip_rewards import CLIPImageFeatures
from ..rewards.checks import check_reward, reward_name
from ..rewards.image_rewards import WeightedSumReward, call_reward
from ..rewards.registry import load_reward
from ..serialization.checkpoints import CheckpointError
from ..serialization.saved import HubPushError, mask_token
from ..trainers.base import tracker_names
from ..trainers.costs import describe_model_estimate, modelled_seconds
from ..trainers.distributed import run_on_main, run_on_main_patiently
from ..trainers.elegant import ElegantTrainer
from ..trainers.elegant_config import ElegantConfig
from ..trainers.seiko import SeikoTrainer
from ..trainers.seiko_config import SeikoConfig
from ..utils.errors import error_line, exit_with_error
from ..utils.run_lock import RunLockedError
from .arguments import (
    PIXEL_FEATURES,
    ElegantScriptArguments,
    SeikoScriptArguments,
    as_flag,
    flag_names,
    parse_script_args,
)
from .presets import PRESETS, TFLOP_PER_EVALUATION, family_of_pipeline
from .validation import Validation

logger = logging.getLogger("hf_control_ft")
# what a run can stop with that the user can act on: one line, everything obtained so far kept on disk
RUN_ERRORS = (FileExistsError, RunLockedError, CheckpointError, FloatingPointError, OracleUnavailableError,
              OracleOutputError, ValueError)


def _fail(message: str):
    exit_with_error(message, status=1)  # flags were checked before: a failure now is the run's, status 1


def make_accelerator(args, config) -> Accelerator:
    """The run's ``Accelerator``: trackers from ``report_to``, precision from ``--mixed_precision`` or the
    ``accelerate launch`` setting; ``--allow_tf32`` (the KL passes keep full fp32, :mod:`..processes.memory`)."""
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(log_with=tracker_names(config.report_to), project_dir=config.logging_dir,
                              mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    return accelerator


def load_pipeline(args, mixed_precision: str | None = None):
    """The base pipeline (class detected from the checkpoint), loaded in the run's dtypes (:func:`load_dtype`); a
    clear error when it cannot be loaded."""
    absent = ("text_encoder_3", "tokenizer_3") if args.without_text_encoder_3 else ()
    dtype = load_dtype(args.kl_precision, mixed_precision)
    try:
        pipe = load_base_pipeline(args.pretrained_model_name_or_path, absent=absent, revision=args.revision,
                                  variant=args.variant, **({"torch_dtype": dtype} if dtype is not None else {}))
    except Exception as err:  # noqa: BLE001 - unreachable Hub, missing files, bad variant: one line each
        _fail(f"cannot load the base model {args.pretrained_model_name_or_path!r}: {error_line(err)}")
    return pipe


def load_prompt_source(args):
    """A list of prompts (``--prompts`` / ``--prompts_file``) or a ``datasets.Dataset`` (``--dataset_name``)."""
    if args.prompts:
        return list(args.prompts)
    if args.prompts_file:
        return args.prompts_file
    import datasets

    try:
        if os.path.isdir(args.dataset_name) and os.path.isfile(os.path.join(args.dataset_name, "dataset_info.json")):
            data = datasets.load_from_disk(args.dataset_name)
            return data[args.dataset_split] if isinstance(data, datasets.DatasetDict) else data
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
    except Exception as err:  # noqa: BLE001
        _fail(f"cannot load --dataset_name {args.dataset_name!r}: {error_line(err)}")


def _reward(spec: str, args, accelerator, offload: bool = False):
    dtype = DTYPES.get(accelerator.mixed_precision) if accelerator.device.type == "cuda" else None
    try:  # specs without a model (files, URLs, image statistics) ignore the model arguments
        fn = load_reward(spec, args.reward_model_name_or_path, args.reward_processor_name_or_path,
                         args.aesthetic_head, torch_dtype=dtype, token=args.hub_token)
    except Exception as err:  # noqa: BLE001 - missing weights, unreachable Hub
        _fail(f"cannot load {spec!r}: {error_line(err)}")
    if isinstance(fn, torch.nn.Module):  # a SEIKO oracle with --offload stays on the CPU until asked
        return fn.to("cpu" if offload else accelerator.device)
    return fn


def _options(args, accelerator) -> dict:
    return dict(guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                height=args.height or args.resolution, width=args.width or args.resolution,
                num_frames=args.num_frames, fps=args.fps, mixed_precision=accelerator.mixed_precision, kl_precision=args.kl_precision,
                base_model=args.pretrained_model_name_or_path, max_sequence_length=args.max_sequence_length,
                prompt_column=args.prompt_column, pre_compute_text_embeddings=args.pre_compute_text_embeddings,
                offload=args.offload, enable_vae_slicing=args.enable_vae_slicing)


def _finish(trainer, args, config, accelerator, validation, summary: dict, metrics: dict, card_info: dict) -> int:
    """Saves the result into ``output_dir``, writes ``metrics.json`` and pushes when asked; returns the exit code.
    The main process does it while the others wait in short collectives (a slow push never meets the
    process-group timeout) and get its exit code or its error."""
    out = config.output_dir
    base = args.base_model()
    repo_id = args.hub_model_id if args.push_to_hub else None

    def publish() -> int:
        trainer.save_pretrained(out, metrics=metrics, sample_grid=validation.last_grid, base_model=base,
                                repo_id=repo_id, card_info=card_info)
        status = 0
        with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as fh:
            json.dump({"metrics": metrics, "train": {k: v for k, v in summary.items() if not isinstance(v, dict)},
                       "network_evaluations": summary.get("network_evaluations")}, fh, indent=2, default=str)
        if args.push_to_hub:
            try:
                info = trainer.push_to_hub(repo_id, private=args.hub_private_repo, token=args.hub_token,
                                           metrics=metrics, sample_grid=validation.last_grid, base_model=base,
                                           card_info=card_info)
                print(f"pushed to {getattr(info, 'commit_url', repo_id)}")
            except HubPushError as err:
                print(f"error: push to {repo_id!r} failed: {err.cause or err}; the trained model is saved in "
                      f"{os.path.abspath(out)}", file=sys.stderr)
                status = 1
        names = ("pytorch_lora_weights.safetensors", "initial_noise", "README.md", "sample_grid.png", "validation",
                 "metrics.json", "logs")
        print(f"saved to {os.path.abspath(out)}: {', '.join(n for n in names if os.path.exists(os.path.join(out, n)))}")
        return status

    status = run_on_main_patiently(accelerator, publish)
    accelerator.end_training()
    return status


def _human_oracle(args, config, accelerator):
    """``--oracle human``: people on the rating page, served by the main process (the one that asks the oracle)."""
    try:
        scale = RatingScale(*args.rating_scale)
    except (TypeError, ValueError) as err:
        _fail(f"--rating_scale: {err}")
    return HumanOracle(config.output_dir, scale=scale, ratings_per_query=args.ratings_per_query,
                       serve=accelerator.is_main_process, host=args.rating_host, port=args.rating_port,
                       raters=args.raters, mode=args.rating_mode)


def check_reward_early(fn, spec: str, device, term: str | None = None) -> None:
    """ELEGANT's reward on two random 64x64 images before any diffusion model loads: a wrong output (type,
    shape, non-finite) or a reward without gradient (a black-box scorer: SEIKO's case) stops the script with one
    line. A reward that cannot score such small images is checked on the first real batch instead. A weighted
    mix is checked term by term, and the failing ``term`` is named."""
    if isinstance(fn, WeightedSumReward):
        for name, _, term_fn in fn.items():
            check_reward_early(term_fn, spec, device, term=name)
        return
    what = f"--reward {spec}" + (f" (its term {term})" if term else "")
    images = torch.rand(2, 3, 64, 64, device=device, requires_grad=True)
    try:
        values = call_reward(fn, images, ["a photo of a cat", "a red car in the rain"])
    except Exception as err:  # noqa: BLE001 - the user's code: it may need the real resolution
        logging.getLogger(__name__).warning("%s could not be tried on 64x64 test images (%s); it is checked "
                                            "on the first batch", what, error_line(err))
        return
    try:
        check_reward(values, 2, reward_name(fn), require_grad=True)
    except (TypeError, ValueError) as err:
        if "not differentiable" in str(err):
            _fail(f"{what} is not differentiable (its output has no gradient with respect to the images): "
                  "ELEGANT backpropagates through the reward. A black-box reward (OCR, a VLM judge, a served "
                  f"model, people) is SEIKO's case: train_seiko.py --oracle {spec} --num_rounds 4 "
                  "--queries_per_round 1024 (see docs/seiko.md)")
        _fail(f"{what}: {err}")


def _setup(trainer_cls, args, config, spec: str, validation_reward: bool):
    """Accelerator, reward / oracle (an ELEGANT reward is tried on a tiny batch first), pipeline, prompts, trainer
    and validation: what both scripts build."""
    accelerator = make_accelerator(args, config)
    if getattr(args, "preset_note", None):
        logging.getLogger(__name__).info(args.preset_note)
    fn = _human_oracle(args, config, accelerator) if spec == "human" else _reward(
        spec, args, accelerator, offload=args.offload and trainer_cls is SeikoTrainer)
    if trainer_cls is ElegantTrainer:  # never an oracle: each of its answers may be paid for
        check_reward_early(fn, spec, accelerator.device)
    with accelerator.main_process_first():
        pipe = load_pipeline(args, accelerator.mixed_precision)
        prompts = load_prompt_source(args)
    loaded = family_of_pipeline(pipe)
    preset = getattr(args, "preset_family", None)
    if preset is not None and loaded != preset:  # the preset's batch, steps and memory switches were another's
        _fail(f"--model_family {preset}: the loaded pipeline is {type(pipe).__name__} ({loaded or 'no preset'}); "
              f"pass --model_family {loaded or 'none'}")
    extra = {}
    features = getattr(args, "feature_model_name_or_path", PIXEL_FEATURES)
    if features != PIXEL_FEATURES:  # SEIKO: reward heads and bonus on CLIP image embeddings (the default)
        try:
            with accelerator.main_process_first():
                extra["feature_extractor"] = CLIPImageFeatures.from_pretrained(features, token=args.hub_token)
        except Exception as err:  # noqa: BLE001 - unreachable Hub, not a CLIP checkpoint
            _fail(f"cannot load --feature_model_name_or_path {features!r}: {error_line(err)} (give a local copy, "
                  f"or --feature_model_name_or_path {PIXEL_FEATURES} for pooled-pixel features)")
    try:
        trainer = trainer_cls.from_pipeline(pipe, fn, config, prompts, accelerator=accelerator,
                                            **_options(args, accelerator), **extra)
    except (TypeError, ValueError) as err:
        _fail(as_flag(str(err), flag_names(type(args), type(config))))
    trainer.tracker_init_kwargs = args.init_kwargs()
    if loaded in TFLOP_PER_EVALUATION and accelerator.is_main_process:
        logging.getLogger(__name__).info(model_estimate(trainer, loaded, accelerator.num_processes))
    validation = Validation(args.validation_prompt or [trainer.process.prompts[0]], args.num_validation_images,
                            args.validation_steps, config.output_dir, reward_fn=fn if validation_reward else None,
                            seed=config.seed)
    return accelerator, trainer, validation


def model_estimate(trainer, family: str, num_processes: int) -> str:
    """The cost model's GPU-hours for this run (:func:`~hf_control_ft.trainers.costs.modelled_seconds`): the family's
    FLOPs at its preset size scaled by this run's pixels (and frames), before anything is measured."""
    process, preset = trainer.process, PRESETS[family]
    options = process.options
    try:  # this run's latent size over the preset's (the same process at the preset's size)
        at_preset = process.latent_shape(preset.get("height", preset.get("resolution")),
                                         preset.get("width", preset.get("resolution")))
        scale = math.prod(process.sample_shape) / math.prod(at_preset)
        if "num_frames" in preset and options.num_frames:  # latent_shape keeps this run's frames
            scale *= options.num_frames / preset["num_frames"]
    except (TypeError, ValueError):
        scale = 1.0
    tflop = TFLOP_PER_EVALUATION[family] * scale
    stochastic = len(trainer.sampler.schedule.random_steps())
    seconds = modelled_seconds(trainer.config, tflop, options.kl_precision in ("fp32", "upcast"), stochastic)
    samples = trainer.config.batch_size * trainer.config.gradient_accumulation_steps
    return describe_model_estimate(seconds, num_processes, samples)


#: the switches that lower memory, in the order to try them (the presets of large families set most of them)
MEMORY_SWITCHES = ("--kl_precision delta", "--gradient_checkpointing", "--pre_compute_text_embeddings", "--offload",
                   "--enable_vae_slicing", "--batch_size 1 --gradient_accumulation_steps N",
                   "--rollout_batch_size 1", "--noise_batch_size 1", "--truncate_backprop_steps K")


def out_of_memory_message(trainer, args) -> str:
    """One line for an out-of-memory stop: where it happened, the switches, and the preset that fits."""
    where = f"at drift step {trainer.global_step + 1}" if getattr(trainer, "global_step", 0) else \
        "before the first drift step (stage 1-2 rollouts, or the first drift step)"
    family = getattr(args, "preset_family", None)
    off = [s for s in MEMORY_SWITCHES if not _switch_on(s, args, trainer.config)]
    preset = f"; the {family} preset already sets the others" if family else ""
    return (f"out of accelerator memory {where}: turn on {', '.join(off) or 'nothing left'} (docs/text_to_image.md, "
            f"memory){preset}. The largest families need half-precision frozen weights (--kl_precision delta or "
            f"upcast) and batch 1 on one 80 GB GPU; on several GPUs --config_file examples/accelerate/fsdp.yaml "
            f"shards the frozen network (README: memory per preset).")


def _switch_on(switch: str, args, config) -> bool:
    name = switch.split()[0][2:]
    value = getattr(args, name, getattr(config, name, None))
    if name == "kl_precision":
        return value in ("upcast", "tf32", "autocast", "delta")
    if name in ("batch_size", "rollout_batch_size", "noise_batch_size"):
        return value == 1
    if name == "truncate_backprop_steps":
        return value is not None
    return bool(value)


def _train(trainer, args=None, **kwargs) -> dict:
    try:
        return trainer.train(**kwargs)
    except torch.OutOfMemoryError:
        _fail(out_of_memory_message(trainer, args))
    except RUN_ERRORS as err:  # the whole message, in flags: these say what to do
        _fail(as_flag(f"{type(err).__name__}: {err}", flag_names(type(args), type(trainer.config))))


def run_elegant(argv=None, prog: str = "train_elegant.py") -> int:
    """``accelerate launch examples/text_to_image/train_elegant.py --pretrained_model_name_or_path ... --reward
    ... --prompts_file ...``: every :class:`ElegantConfig` field is a flag (``--help``)."""
    args, config = parse_script_args(ElegantScriptArguments, ElegantConfig, argv, prog=prog,
                                     description="ELEGANT on a text-to-image diffusers pipeline.")
    accelerator, trainer, validation = _setup(ElegantTrainer, args, config, args.reward, validation_reward=True)
    summary = _train(trainer, args, resume_from_checkpoint=args.resume_from_checkpoint, callback=validation)
    # a run resumed after its last step has no validation yet (only the main process keeps the grid: its answer
    # is every process's, since run() is collective)
    if run_on_main(accelerator, lambda: validation.last_grid is None):
        validation.run(trainer, trainer.global_step, trainer.log_step(trainer.global_step))
    metrics = {"reward (training batch)": summary.get("train/reward"),
               "KL per sample, chain + start law (nats)": summary.get("train/kl_total"), **validation.last_metrics}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return _finish(trainer, args, config, accelerator, validation, summary, metrics,
                   {"dataset": args.card_dataset()})


def run_seiko(argv=None, prog: str = "train_seiko.py") -> int:
    """``accelerate launch examples/text_to_image/train_seiko.py --pretrained_model_name_or_path ... --oracle
    file.py:fn --prompts_file ...``: every :class:`SeikoConfig` field is a flag (``--help``). The oracle is
    not called for validation (it is the expensive part)."""
    args, config = parse_script_args(SeikoScriptArguments, SeikoConfig, argv, prog=prog,
                                     description="SEIKO (online feedback) on a text-to-image diffusers pipeline.")
    accelerator, trainer, validation = _setup(SeikoTrainer, args, config, args.oracle, validation_reward=False)
    summary = _train(trainer, args, callback=validation.round_callback)
    if validation.last_grid is None:  # every round was already done (a finished run, restarted)
        validation.run(trainer, trainer.completed_rounds, trainer.global_step, name="final")
    metrics = {k: summary[k] for k in ("round/oracle_mean", "round/total_queries", "train/kl_pretrained")
               if isinstance(summary.get(k), (int, float))}
    card_info = {"dataset": args.card_dataset()}
    if args.push_to_hub and args.feedback_dataset_id:
        card_info["seiko"] = {"feedback": f"[`{args.feedback_dataset_id}`](https://huggingface.co/datasets/"
                                          f"{args.feedback_dataset_id})"}
    status = _finish(trainer, args, config, accelerator, validation, summary, metrics, card_info)
    if args.push_to_hub and args.feedback_dataset_id and status == 0 and trainer.is_main_process:
        try:
            trainer.feedback.push_to_hub(args.feedback_dataset_id, private=args.hub_private_repo,
                                         token=args.hub_token)
        except Exception as err:  # noqa: BLE001 - the answers stay on disk in output_dir/feedback
            message = mask_token(f"{type(err).__name__}: {err}", args.hub_token)
            print(f"error: pushing the feedback dataset failed ({message}); every answer is kept in "
                  f"{os.path.join(config.output_dir, 'feedback')}", file=sys.stderr)
            status = 1
    return status


__all__ = ["run_elegant", "run_seiko", "load_pipeline", "load_dtype", "load_prompt_source", "make_accelerator"]
