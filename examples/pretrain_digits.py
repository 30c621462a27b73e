"""Pretrain the digits base model and the two digit classifiers (cached; reused when present).

    python examples/pretrain_digits.py [--cache_dir cache/digits] [--steps 3000]

Writes ``<cache_dir>/pipeline`` (a stock diffusers ``DDPMPipeline``: ``DDPMPipeline.from_pretrained`` loads it),
``proxy_classifier/`` and ``genuine_classifier/`` (safetensors + config, trained on disjoint halves of
scikit-learn's digits), ``classifiers.json`` (held-out accuracies) and ``pretrained_samples.png``.
"""

import argparse
import json
import os
import time

import torch

from hf_control_ft.tasks import digits


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache_dir", default=digits.default_cache_dir())
    parser.add_argument("--steps", type=int, default=3000, help="UNet training steps (batch 64)")
    parser.add_argument("--classifier_epochs", type=int, default=60)
    args = parser.parse_args()

    t0 = time.perf_counter()
    unet, scheduler = digits.load_or_pretrain_digits_model(args.cache_dir, steps=args.steps)
    t1 = time.perf_counter()
    proxy, genuine = digits.load_or_train_classifiers(args.cache_dir, epochs=args.classifier_epochs)
    t2 = time.perf_counter()

    from diffusers import DDPMPipeline

    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    images = pipe(batch_size=64, generator=torch.Generator().manual_seed(0), num_inference_steps=50,
                  output_type="np").images
    samples = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    grid_path = os.path.join(args.cache_dir, "pretrained_samples.png")
    digits.digits_grid(samples).save(grid_path)
    with open(os.path.join(args.cache_dir, "classifiers.json"), encoding="utf-8") as f:
        accuracies = json.load(f)
    print(json.dumps({"pipeline": digits.digits_pipeline_path(args.cache_dir), "sample_grid": grid_path,
                      "unet_seconds": round(t1 - t0, 1), "classifier_seconds": round(t2 - t1, 1),
                      **accuracies}, indent=2))


if __name__ == "__main__":
    main()
