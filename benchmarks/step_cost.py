"""Cost of an ELEGANT drift iteration relative to plain reward backpropagation, and memory vs. steps.

(a) seconds per ELEGANT iteration (rollout + backward sweep with the exact KL) divided by seconds per plain
    reward-backprop iteration (same rollout and sweep, no KL, no initial-noise model), same batch, steps and
    checkpointing. The exact KL gradient needs one extra pretrained forward and one input-gradient backward
    per step; target <= 1.8.
(b) peak memory of one iteration with 50 differentiable steps divided by that with 10 steps; target <= 1.3.
    On CUDA: torch.cuda.max_memory_allocated. On CPU: each measurement runs in a fresh subprocess and
    reports the growth of its resident-set high-water mark (ru_maxrss) during the iteration.

The model is a small diffusers UNet2DModel with attention (LoRA on to_q/to_k/to_v/to_out.0). Prints JSON.

    python benchmarks/step_cost.py [--batch_size 16] [--steps 20] [--size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel

from hf_control_ft import ElegantConfig, ElegantTrainer


def build(args, steps, plain=False):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=args.size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=8).to(args.device)
    unet.requires_grad_(False)
    cfg = ElegantConfig(alpha=1.0, eta=1.0, num_inference_steps=steps, learn_initial_noise=not plain,
                        batch_size=args.batch_size, report_to=None, lora_rank=4, noise_num_steps=10,
                        aux_hidden=32, drift_objective="pathwise")  # the cost of the exact sweep

    def brightness(x):
        return x.mean(dim=(1, 2, 3))

    trainer = ElegantTrainer(cfg, unet, DDIMScheduler(num_train_timesteps=1000), brightness,
                             (3, args.size, args.size))
    params = [p for n, p in trainer.model.named_parameters() if p.requires_grad]
    return trainer, params, torch.optim.AdamW(params, lr=1e-4)


def one_iteration(trainer, params, opt, plain):
    if plain:
        trainer.reward_backprop_step(opt)
    else:
        trainer.drift_step(opt, params)


def time_iterations(args, plain):
    trainer, params, opt = build(args, args.steps, plain)
    one_iteration(trainer, params, opt, plain)  # warm-up
    times = []
    for _ in range(args.repeats):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        one_iteration(trainer, params, opt, plain)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_memory_mb(args, steps):
    if args.device == "cuda":
        args.size = args.memory_size
        trainer, params, opt = build(args, steps)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_iteration(trainer, params, opt, False)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--_memory_child", str(steps), "--batch_size", str(args.batch_size),
           "--size", str(args.memory_size)]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def memory_child(args, steps):
    trainer, params, opt = build(args, steps)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    one_iteration(trainer, params, opt, False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="sampling steps for the time ratio")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--memory_size", type=int, default=32,
                   help="image size for the memory ratio (large enough that activations dominate on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--_memory_child", type=int, default=None)
    args = p.parse_args()
    if args._memory_child is not None:
        args.device = "cpu"
        print(memory_child(args, args._memory_child))
        return
    t_plain = time_iterations(args, plain=True)
    t_elegant = time_iterations(args, plain=False)
    out = {"benchmark": "step_cost", "device": args.device, "batch_size": args.batch_size, "steps": args.steps,
           "sample_shape": [3, args.size, args.size], "seconds_per_iteration_plain": round(t_plain, 4),
           "seconds_per_iteration_elegant": round(t_elegant, 4), "time_ratio": round(t_elegant / t_plain, 3),
           "time_ratio_target": 1.8}
    m10, m50 = peak_memory_mb(args, 10), peak_memory_mb(args, 50)
    out.update({"memory_sample_shape": [3, args.memory_size, args.memory_size],"peak_memory_mb_10_steps": round(m10, 1), "peak_memory_mb_50_steps": round(m50, 1),
                "memory_ratio_50_over_10": round(m50 / m10, 3) if m10 > 0 else None, "memory_ratio_target": 1.3})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
