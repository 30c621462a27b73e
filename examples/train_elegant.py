"""Fine-tune the pretrained digits model toward a target digit with ELEGANT (the main job of ``make demo``).

    accelerate launch examples/train_elegant.py --config examples/configs/digits_elegant.yaml \\
        [--target_digit 3] [--resume_from_checkpoint latest] [--alpha 0.5 --train_steps 100 ...]

    # two CPU processes (gloo):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_elegant.py --config ...

The trainer sees the *proxy* reward (log-probability of the target digit under an MLP classifier trained on one
half of scikit-learn's digits); the *genuine* classifier, trained on the other half, only evaluates. Every
``--key value`` not listed below overrides a field of ``ElegantConfig`` (unknown keys are errors).

Writes to ``output_dir`` (main process only): the adapter, initial-noise model and config, ``README.md`` (model
card), ``samples_before.png``, ``samples_after.png``, ``metrics.json``, TensorBoard logs in ``logs/`` and
``checkpoint-<step>/`` directories. An existing non-empty output directory is never overwritten silently: pass
``--overwrite_output_dir`` to replace it or ``--resume_from_checkpoint latest`` to continue it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
from accelerate import Accelerator

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.tasks import digits
from hf_control_ft.trainers.distributed import run_on_main
from hf_control_ft.utils.config_cli import format_help
from hf_control_ft.utils.run_lock import RunLock

DEFAULT_OUTPUT_DIR = os.path.join("outputs", "digits-elegant")
CARD_METRICS = ("proxy_reward", "genuine_reward", "genuine_target_rate", "diversity_pairwise_distance",
                "distinct_classes")


def parse_args(argv=None):
    config_fields = format_help([ElegantConfig]).split("\n", 2)[2]  # every config field, with its help
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=config_fields,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file whose keys are ElegantConfig fields")
    parser.add_argument("--target_digit", type=int, default=3)
    parser.add_argument("--cache_dir", default=None, help="pretrained model + classifiers (default ./cache/digits)")
    parser.add_argument("--pretrain_steps", type=int, default=3000, help="UNet pretraining steps when not cached")
    parser.add_argument("--classifier_epochs", type=int, default=60, help="classifier training when not cached")
    parser.add_argument("--num_eval_samples", type=int, default=512)
    parser.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint directory")
    parser.add_argument("--overwrite_output_dir", "--overwrite", dest="overwrite", action="store_true",
                        help="replace an existing output directory (diffusers' name; --overwrite also works)")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"),
                        help="only 'no': the 0.18M-parameter digits model trains in fp32 (mixed precision is for "
                             "the text-to-image scripts in examples/text_to_image/)")
    args, rest = parser.parse_known_args(argv)
    if args.mixed_precision != "no":
        parser.error("--mixed_precision: the digits model trains in fp32; mixed precision applies to the "
                     "text-to-image scripts (examples/text_to_image/train_elegant.py)")
    try:
        config = ElegantConfig.from_cli(args.config, rest)
    except ValueError as err:  # unknown key, bad value, unreadable config: one line, exit status 2
        parser.error(str(err))
    if config.output_dir is None:
        config.output_dir = DEFAULT_OUTPUT_DIR
    if config.logging_dir is None:
        config.logging_dir = os.path.join(config.output_dir, "logs")
    return args, config


def check_output_dir(args, config, accelerator):
    """Refuses to reuse a non-empty output directory unless resuming or ``--overwrite``."""
    out = config.output_dir
    if os.path.isdir(out) and os.listdir(out) and not args.resume_from_checkpoint:
        if not args.overwrite:
            raise SystemExit(f"output directory {out!r} exists and is not empty: pass --resume_from_checkpoint "
                             f"latest to continue that run, --overwrite_output_dir to replace it, or --output_dir elsewhere")

        def replace():
            with RunLock(out):  # never delete a directory another run is using: its error stops every process
                shutil.rmtree(out)

        run_on_main(accelerator, replace)
    accelerator.wait_for_everyone()


def evaluate(trainer, proxy, genuine, target, n, controlled, seed=1234):
    samples = trainer.sample(n, generator=torch.Generator().manual_seed(seed), batch_size=256, controlled=controlled)
    return samples, digits.digits_metrics(samples.cpu(), proxy, genuine, target)


def run(argv=None) -> ElegantTrainer:
    """Parses ``argv``, trains, evaluates and writes the outputs; returns the trainer (every process)."""
    args, config = parse_args(argv)
    log_with = None if config.report_to in (None, "none") else config.report_to
    accelerator = Accelerator(log_with=log_with, project_dir=config.logging_dir)
    check_output_dir(args, config, accelerator)

    with accelerator.main_process_first():  # the main process pretrains / caches, the others load
        unet, scheduler = digits.load_or_pretrain_digits_model(args.cache_dir, steps=args.pretrain_steps,
                                                               progress=accelerator.is_main_process)
        proxy, genuine = digits.load_or_train_classifiers(args.cache_dir, epochs=args.classifier_epochs)
    reward = digits.DigitReward(proxy, args.target_digit, name="proxy_digit_logprob").to(accelerator.device)

    trainer = ElegantTrainer(config, unet, scheduler, reward, sample_shape=digits.SAMPLE_SHAPE,
                             accelerator=accelerator)
    out = config.output_dir
    before = None
    # the main process evaluates (a sharded network, --fsdp, samples on every process: each call is collective)
    evaluates = accelerator.is_main_process or trainer.sharded
    if evaluates:  # written once training holds the directory (a second run writes nothing)
        samples_before, before = evaluate(trainer, proxy, genuine, args.target_digit, args.num_eval_samples, False)

    summary = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    grid, card_metrics, after = None, None, None
    if evaluates:
        samples, after = evaluate(trainer, proxy, genuine, args.target_digit, args.num_eval_samples, True)
    if accelerator.is_main_process:
        digits.digits_grid(samples_before[:64]).save(os.path.join(out, "samples_before.png"))
        grid = digits.digits_grid(samples[:64])
        grid.save(os.path.join(out, "samples_after.png"))
        metrics = {"target_digit": args.target_digit, "pretrained": before, "elegant": after,
                   "train": {k: v for k, v in summary.items() if not isinstance(v, dict)}}
        with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        card_metrics = {f"{k} ({name})": m[k] for k in CARD_METRICS
                        for name, m in (("pretrained", before), ("ELEGANT", after))}
        card_metrics["KL per sample, chain + start law (nats)"] = summary.get("train/kl_total")
    cache_dir = os.path.abspath(args.cache_dir or digits.default_cache_dir())
    trainer.save_pretrained(out, metrics=card_metrics, sample_grid=grid,  # main process only
                            base_model=digits.digits_pipeline_path(cache_dir))
    if accelerator.is_main_process:
        # what the model is, never where it lives: `hf-control-ft evaluate` finds the digits model and classifiers
        # in its own --cache_dir (default ./cache/digits or $HF_CONTROL_FT_CACHE)
        task = {"task": "digits", "target_digit": args.target_digit, "reward": reward.__name__}
        with open(os.path.join(out, "task.json"), "w", encoding="utf-8") as f:
            json.dump(task, f, indent=2)
        print(f"\n{'metric':<30}{'pretrained':>12}{'ELEGANT':>12}")
        for k in CARD_METRICS:
            print(f"{k:<30}{before[k]:>12.3f}{after[k]:>12.3f}")
        print(f"train KL (nats/sample, last batch): chain {summary.get('train/kl', float('nan')):.3f} + start law "
              f"{summary.get('train/kl_init', 0.0):.3f} = {summary.get('train/kl_total', float('nan')):.3f}")
        print(f"\noutputs in {os.path.abspath(out)}: samples_before.png, samples_after.png, metrics.json, "
              f"README.md, logs/ (tensorboard --logdir {config.logging_dir})")
    accelerator.wait_for_everyone()
    return trainer


def main(argv=None) -> int:
    trainer = run(argv)
    trainer.accelerator.end_training()  # the end of the script: trackers closed, process group destroyed
    return 0


if __name__ == "__main__":
    sys.exit(main())
