"""The ``hf-control-ft`` command line: look at and measure a saved ELEGANT adapter directory.

    hf-control-ft sample   outputs/digits-elegant --num_samples 64 --output grid.png
    hf-control-ft evaluate outputs/digits-elegant --num_samples 512

The base model is a local diffusers pipeline directory (``--base_model``), by default the one recorded in the
adapter directory's ``task.json`` (written by ``examples/train_elegant.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

TASK_FILE = "task.json"


def read_task(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, TASK_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_trainer(adapter_dir: str, base_model: str | None):
    """An ``ElegantTrainer`` (inference use) on the base pipeline's UNet with the saved adapter."""
    from diffusers import DiffusionPipeline

    from .trainers.elegant import ElegantTrainer

    if not os.path.isdir(adapter_dir):
        raise SystemExit(f"adapter directory {adapter_dir!r} does not exist")
    base = base_model or read_task(adapter_dir).get("base_model")
    if not base:
        raise SystemExit(f"no base model: pass --base_model (a local diffusers pipeline directory); "
                         f"{adapter_dir}/{TASK_FILE} does not name one")
    if not os.path.isfile(os.path.join(base, "model_index.json")):
        raise SystemExit(f"base model {base!r} is not a local diffusers pipeline directory (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(base)
    return ElegantTrainer.from_pretrained(adapter_dir, pipe.unet, pipe.scheduler, report_to=None)


def cmd_sample(args) -> int:
    from .utils.images import image_grid

    trainer = load_trainer(args.adapter_dir, args.base_model)
    samples = trainer.sample(args.num_samples, generator=torch.Generator().manual_seed(args.seed),
                             controlled=not args.pretrained)
    scale = max(1, 64 // samples.shape[-1])
    image_grid(samples, scale=scale).save(args.output)
    print(f"wrote {args.num_samples} {'pretrained' if args.pretrained else 'fine-tuned'} samples to {args.output}")
    return 0


def cmd_evaluate(args) -> int:
    from .tasks import digits

    task = read_task(args.adapter_dir)
    target = args.target_digit if args.target_digit is not None else task.get("target_digit")
    if target is None:
        raise SystemExit("evaluate needs --target_digit (not recorded in task.json)")
    trainer = load_trainer(args.adapter_dir, args.base_model)
    proxy, genuine = digits.load_or_train_classifiers(args.cache_dir or task.get("cache_dir"))
    result = {"target_digit": int(target)}
    for name, controlled in (("pretrained", False), ("fine_tuned", True)):
        x = trainer.sample(args.num_samples, generator=torch.Generator().manual_seed(args.seed),
                           controlled=controlled)
        result[name] = digits.digits_metrics(x.cpu(), proxy, genuine, int(target))
    text = json.dumps(result, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-control-ft",
                                     description="Look at and measure a saved ELEGANT adapter directory.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="write an image grid of samples from a saved adapter directory")
    s.add_argument("adapter_dir")
    s.add_argument("--base_model", default=None, help="local diffusers pipeline directory of the base model")
    s.add_argument("--num_samples", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", default="samples.png")
    s.add_argument("--pretrained", action="store_true", help="sample the base model instead (adapter disabled)")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="digits metrics (proxy/genuine reward, diversity) of a saved adapter")
    e.add_argument("adapter_dir")
    e.add_argument("--base_model", default=None)
    e.add_argument("--cache_dir", default=None, help="digits cache with the classifiers (default: from task.json)")
    e.add_argument("--target_digit", type=int, default=None)
    e.add_argument("--num_samples", type=int, default=512)
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--output", default=None, help="also write the JSON here")
    e.set_defaults(func=cmd_evaluate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
