"""Reward collapse, measured on the digits task: proxy reward, genuine reward and diversity for the pretrained
model, ELEGANT at a few alphas, and no-KL reward maximisation (alpha -> 0, the AlignProp / DRaFT regime).

    python benchmarks/reward_collapse.py [--alphas 0.3 1 3] [--train_steps 100] [--out outputs/reward_collapse]

The trainer only sees the proxy classifier; the genuine classifier (trained on the other half of the data)
judges. Prints JSON; writes ``reward_collapse.png`` (the three measures per method) and one sample grid per
method to ``--out``. The pretrained model and classifiers come from the digits cache (trained if missing).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.tasks import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("proxy_reward", "genuine_reward", "genuine_target_rate", "diversity_pairwise_distance",
        "target_class_pairwise_distance", "class_entropy_nats")


def run_method(name, config, unet, scheduler, reward, proxy, genuine, target, n_eval, out):
    t0 = time.perf_counter()
    trainer = ElegantTrainer(config, copy.deepcopy(unet), scheduler, reward, digits.SAMPLE_SHAPE)
    summary = trainer.train() if name != "pretrained" else {}
    samples = trainer.sample(n_eval, generator=torch.Generator().manual_seed(1234), batch_size=256,
                             controlled=name != "pretrained")
    digits.digits_grid(samples[:64]).save(os.path.join(out, f"samples_{name}.png"))
    metrics = digits.digits_metrics(samples, proxy, genuine, target)
    metrics.update({"alpha": config.alpha if name != "pretrained" else None,
                    "path_kl": summary.get("train/kl_total"),  # the chain's steps + the start law's (last batch)
                    "initial_noise_kl": summary.get("train/kl_init"),
                    "seconds": round(time.perf_counter() - t0, 1)})
    return metrics


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = (("proxy_reward", "proxy reward (trained on)"), ("genuine_reward", "genuine reward (held out)"),
              ("diversity_pairwise_distance", "diversity: mean pairwise L2"),
              ("target_class_pairwise_distance", "style diversity within the target class"))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(range(len(names)), [results[n][key] or 0.0 for n in names],
               color=["grey"] + ["tab:blue"] * (len(names) - 2) + ["tab:red"])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle("digits: reward fine-tuning with (ELEGANT) and without (no-KL) the KL to the pretrained model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "examples", "configs", "digits_elegant.yaml"))
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--no_kl_alpha", type=float, default=1e-4, help="the alpha -> 0 limit")
    parser.add_argument("--train_steps", type=int, default=None, help="override the config's train_steps")
    parser.add_argument("--target_digit", type=int, default=3)
    parser.add_argument("--num_eval_samples", type=int, default=512)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--out", default=os.path.join("outputs", "reward_collapse"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    unet, scheduler = digits.load_or_pretrain_digits_model(args.cache_dir)
    proxy, genuine = digits.load_or_train_classifiers(args.cache_dir)
    reward = digits.DigitReward(proxy, args.target_digit, name="proxy_digit_logprob")
    overrides = dict(output_dir=None, checkpointing_steps=0, report_to=None)
    if args.train_steps is not None:
        overrides["train_steps"] = args.train_steps
    base = ElegantConfig.from_yaml(args.config, **overrides)

    methods = {"pretrained": base}
    for alpha in args.alphas:
        methods[f"elegant_alpha{alpha:g}"] = ElegantConfig.from_dict({**base.to_dict(), "alpha": alpha})
    # no KL: reward backpropagation through the sampler from fixed N(0, I) noise (AlignProp / DRaFT)
    methods["no_kl"] = ElegantConfig.from_dict({**base.to_dict(), "alpha": args.no_kl_alpha,
                                                "learn_initial_noise": False})
    images, labels = digits.load_digits_tensors()
    data_style = digits.mean_pairwise_distance(images[labels == args.target_digit])
    results = {}
    for name, config in methods.items():
        results[name] = run_method(name, config, unet, scheduler, reward, proxy, genuine, args.target_digit,
                                   args.num_eval_samples, args.out)
        print(name, json.dumps({k: results[name][k] for k in KEYS}), file=sys.stderr, flush=True)
    plot(results, os.path.join(args.out, "reward_collapse.png"))
    print(json.dumps({"target_digit": args.target_digit, "train_steps": base.train_steps,
                      "data_target_class_pairwise_distance": data_style,
                      "num_eval_samples": args.num_eval_samples, "results": results,
                      "plot": os.path.join(args.out, "reward_collapse.png")}, indent=2))


if __name__ == "__main__":
    main()
