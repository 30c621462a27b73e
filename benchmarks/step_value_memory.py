"""Memory and time of the value-guided drift's per-step values on a latent text-to-image pipeline, as JSON.

For each number ``m`` of latents kept per pretrained rollout (``--kept``; ``all`` = every step, what the fit
stored before ``ElegantConfig.step_value_states_per_rollout`` existed), in a fresh process: the per-step value
fit (``--rollouts`` pretrained rollouts of ``--steps`` steps with classifier-free guidance, ``m`` latents kept per
rollout, prompt-conditional regression) and one value-guided drift iteration. Reported: the stored latents
(MiB), the fit's seconds (rollouts + regression), one drift iteration's seconds, and peak memory (GPU:
``torch.cuda.max_memory_allocated`` after the model is loaded, so the stage's own memory; CPU: peak RSS of the
process). Random weights at the real shapes (``benchmarks/model_shapes.py``); no download.

    python benchmarks/step_value_memory.py --tiny                      # CPU smoke test, tiny SD pipeline
    python benchmarks/step_value_memory.py --model sd15 --resolution 256 --rollouts 256 --steps 20   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_shapes import build_pipeline  # noqa: E402

from hf_control_ft import ElegantConfig, ElegantTrainer  # noqa: E402
from hf_control_ft.core.control import lora_parameters  # noqa: E402
from hf_control_ft.rewards.image_rewards import BrightnessReward  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car in the rain", "the mountains at dawn", "a bowl of fruit"]


def _gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def one(args, kept: str) -> dict:
    """One setting, in this process."""
    pipe = build_pipeline(args.model, args.tiny).to(args.device)
    cfg = ElegantConfig(alpha=1.0, drift_objective="value_guided", num_inference_steps=args.steps,
                        batch_size=args.batch_size, value_num_rollouts=args.rollouts,
                        rollout_batch_size=args.rollout_batch_size, step_value_train_steps=args.fit_steps,
                        step_value_states_per_rollout=args.steps if kept == "all" else int(kept),
                        learn_initial_noise=False, aux_hidden=64, lora_rank=4, report_to=None,
                        gradient_checkpointing=True)
    trainer = ElegantTrainer.from_pipeline(pipe, BrightnessReward(), cfg, prompts=PROMPTS,
                                           mixed_precision="no" if args.dtype == "fp32" else args.dtype,
                                           height=args.resolution, width=args.resolution)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    t0 = time.perf_counter()
    metrics = trainer.fit_step_values()
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    peak_fit = _gib(args.device)
    rss_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    params = lora_parameters(trainer.model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t2 = time.perf_counter()
    trainer.drift_step(opt, params)
    if cuda:
        torch.cuda.synchronize()
    t3 = time.perf_counter()
    out = {"kept_per_rollout": metrics["step_values/states_per_rollout"],
           "stored_latents_mib": round(metrics["step_values/stored_mib"], 2),
           "fit_seconds": round(t1 - t0, 2), "drift_iteration_seconds": round(t3 - t2, 2)}
    if cuda:
        out.update({"model_memory_gib": round(loaded, 2), "fit_peak_gib": round(peak_fit - loaded, 3),
                    "drift_peak_gib": round(_gib(args.device) - loaded, 3)})
    else:
        out.update({"rss_before_fit_mib": round(rss0), "peak_rss_after_fit_mib": round(rss_fit),
                    "peak_rss_after_drift_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["sd15", "sdxl", "sd3", "flux"], default="sd15")
    p.add_argument("--tiny", action="store_true", help="the tiny test pipeline on CPU")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rollouts", type=int, default=256)
    p.add_argument("--rollout_batch_size", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=2, help="drift batch")
    p.add_argument("--fit_steps", type=int, default=200, help="optimiser steps of the value regression")
    p.add_argument("--kept", nargs="+", default=["all", "4", "1"], help="latents kept per rollout ('all' or ints)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = p.parse_args()
    if args.tiny:
        args.device, args.resolution, args.dtype = "cpu", 16, "fp32"
    if args.one is not None:
        print(json.dumps(one(args, args.one)))
        return
    results = []
    for kept in args.kept:  # a fresh process each, so peak memory is that setting's
        cmd = [sys.executable, os.path.abspath(__file__), "--one", kept] + sys.argv[1:]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"setting kept={kept} failed:\n{res.stderr[-3000:]}")
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "step_value_memory", "model": f"tiny-random-{args.model}" if args.tiny
                      else f"{args.model}-shaped-random", "device": args.device,
                      "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "dtype": args.dtype,
                      "resolution": args.resolution, "steps": args.steps, "rollouts": args.rollouts,
                      "fit_steps": args.fit_steps, "results": results}, indent=1))


if __name__ == "__main__":
    main()
