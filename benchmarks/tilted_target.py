"""Exact-target benchmark (ALGORITHMS.md §5): does ELEGANT sample p_pre(x) exp(r(x)/alpha) / Z?

Pretrained law: a 2-D three-mode Gaussian mixture with unequal weights; the pretrained model is a small MLP
denoiser distilled to its exact noise prediction. Reward r(x) = c . x, whose tilted target is a mixture in
closed form. For the pretrained model, ELEGANT, and ELEGANT with learn_initial_noise=False it reports the
total-variation distance between the samples' mode weights and the target weights, and each mode's mean
error, at eta = 1 and at a low-noise setting. Prints one JSON object.

    python benchmarks/tilted_target.py                 # full run (CPU, a few minutes)
    python benchmarks/tilted_target.py --quick         # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import DDIMScheduler

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.gaussian_mixture import distill_mixture_denoiser, three_mode_mixture


def evaluate(target, x):
    return {"tv": round(target.mode_weight_tv(x), 4),
            "mode_mean_errors": [round(e, 4) for e in target.mode_mean_errors(x)],
            "mode_weights": [round(float(w), 4) for w in
                             torch.bincount(target.assign(x), minlength=len(target.weights)).double() / len(x)]}


def run_setting(denoiser_state, scheduler, target, reward, args, eta, learn_initial_noise):
    from hf_control_ft.networks import MLPDenoiser

    model = MLPDenoiser(**denoiser_state["config"])
    model.load_state_dict(denoiser_state["weights"])
    model.requires_grad_(False)
    cfg = ElegantConfig(alpha=args.alpha, eta=eta, num_inference_steps=args.steps,
                        learn_initial_noise=learn_initial_noise, train_steps=args.train_steps,
                        batch_size=args.batch_size, learning_rate=args.lr, lora_rank=8, seed=args.seed,
                        value_num_rollouts=args.value_rollouts, value_train_steps=args.value_train_steps,
                        noise_train_steps=args.noise_train_steps, report_to=None, max_grad_norm=args.max_grad_norm,
                        lr_scheduler=args.lr_scheduler)
    trainer = ElegantTrainer(cfg, model, scheduler, reward, (2,))
    gen = torch.Generator().manual_seed(1234)
    out = {}
    if learn_initial_noise:  # the pretrained model, same sampler
        out["pretrained"] = evaluate(target, trainer.sample(args.eval_samples, gen, 2048, controlled=False))
    t0 = time.perf_counter()
    summary = trainer.train()
    out["train_seconds"] = round(time.perf_counter() - t0, 1)
    out["final_reward"] = round(summary["train/reward"], 4)
    out["final_kl"] = round(summary["train/kl"] + summary["train/kl_init"], 4)
    out["samples"] = evaluate(target, trainer.sample(args.eval_samples, torch.Generator().manual_seed(99), 2048))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--low_eta", type=float, default=0.2)
    p.add_argument("--train_steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max_grad_norm", type=float, default=None)
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--value_rollouts", type=int, default=4096)
    p.add_argument("--value_train_steps", type=int, default=500)
    p.add_argument("--noise_train_steps", type=int, default=200)
    p.add_argument("--distill_steps", type=int, default=1500)
    p.add_argument("--eval_samples", type=int, default=8192)
    p.add_argument("--etas", type=str, default=None, help="comma-separated etas (default: 1.0,low_eta)")
    p.add_argument("--skip_fixed_noise", action="store_true", help="run only ELEGANT with learned noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    args = p.parse_args()
    if args.quick:
        args.train_steps, args.distill_steps, args.value_rollouts = 30, 300, 1024
        args.value_train_steps, args.noise_train_steps, args.eval_samples, args.steps = 100, 50, 2048, 20

    mixture = three_mode_mixture()
    c = torch.tensor([0.5, 0.3])
    target = mixture.tilted_linear(c, args.alpha)

    def linear_reward(x):
        return x @ c.to(x)

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    t0 = time.perf_counter()
    den = distill_mixture_denoiser(mixture, scheduler, steps=args.distill_steps, seed=args.seed)
    state = {"config": dict(den.config), "weights": den.state_dict()}
    state["config"] = {k: v for k, v in state["config"].items() if not k.startswith("_")}
    result = {"benchmark": "tilted_target", "alpha": args.alpha, "num_inference_steps": args.steps,
              "reward": "linear c=(0.5, 0.3)", "pretrained_weights": mixture.weights.tolist(),
              "target_weights": [round(float(w), 4) for w in target.weights],
              "target_means": [[round(float(v), 4) for v in m] for m in target.means],
              "distill_seconds": round(time.perf_counter() - t0, 1), "settings": {}}
    etas = [float(e) for e in args.etas.split(",")] if args.etas else [1.0, args.low_eta]
    for eta in etas:
        res = run_setting(state, scheduler, target, linear_reward, args, eta, True)
        result["settings"][f"eta={eta}"] = {"pretrained": res.pop("pretrained"), "elegant": res}
        if not args.skip_fixed_noise:
            fixed = run_setting(state, scheduler, target, linear_reward, args, eta, False)
            result["settings"][f"eta={eta}"]["elegant_fixed_noise"] = fixed
    print(json.dumps(result))


if __name__ == "__main__":
    main()
