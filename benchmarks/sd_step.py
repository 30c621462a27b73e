"""Cost of one ELEGANT training iteration at the shapes of SD 1.5, SDXL, SD3.5 medium or FLUX.1-dev (random
weights, ``benchmarks/model_shapes.py``), as JSON.

One iteration = draw prompts and encode them, sample ``x_T`` from the initial-noise model, roll out the
fine-tuned chain (classifier-free guidance: the UNet runs on 2B samples), decode with the VAE and take the
reward gradient (differentiably), then the backward sweep with the exact per-step KL (fine-tuned and
pretrained UNet per step, adapter-aware block checkpointing), then the optimizer step. The "plain" variant
is the same iteration without the KL and the initial-noise model (N(0, I) start, AlignProp/DRaFT-style
reward backprop), for the ratio.

Reported per batch size: seconds per iteration (best of ``--repeats`` after a warm-up), peak GPU memory
(``torch.cuda.max_memory_allocated``), and achieved TFLOP/s of UNet work: FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` inside the UNet (forward, checkpoint recomputation and
backward) during one separate, untimed iteration, divided by the timed seconds.

    python benchmarks/sd_step.py --dtype bf16 --batch_sizes 1 2 4        # GPU: SD 1.5 shapes, 512x512, 50 steps
    python benchmarks/sd_step.py --model flux --batch_sizes 1 --steps 28 # GPU: FLUX.1-dev shapes, 1024x1024
    python benchmarks/sd_step.py --tiny --model sd3                      # CPU smoke test (tiny pipeline)
    python benchmarks/sd_step.py --models sd15 sdxl sd3 flux --batch_sizes 1 --time_limit 150 --output sd_step.jsonl
    python benchmarks/sd_step.py --models qwen-image flux2-klein z-image wan --batch_sizes 1 --time_limit 150
    python benchmarks/sd_step.py --kl_precision autocast --drift_objective value_guided --train_timestep_fraction 0.25

With ``--models`` every family runs in its own process with its own ``--time_limit`` (seconds) at its real
settings (sd15 512 px / 50 steps, sdxl 1024 / 40, sd3 1024 / 28, flux 1024 / 28, qwen-image 1024 / 30,
flux2-klein 1024 / 28, z-image 1024 / 30, wan 480x832 x 33 frames / 30; shapes in ``benchmarks/model_shapes.py``,
unless ``--steps`` / ``--resolution`` say otherwise), and its JSON line is appended to ``--output`` (and printed) as soon as it is
measured, so a run cut short still reports every family it finished; a family past its limit gets a
``{"timed_out": true}`` line holding the ``"partial"`` figures its process printed before it was stopped (per
mode: build and first-iteration seconds once warm, then the measurement). ``--stack_every S`` prints each
family's main-thread stack to stderr every ``S`` seconds, to see where a family that does not finish spends it. Each batch size reports the ELEGANT iteration, plain reward backprop and one
GRPO-style update over the same number of samples (``benchmarks/finetuner_baselines.py``: SDE rollout without
gradient, then a clipped-ratio update with a KL penalty through every stochastic step), seconds per sample and
the ratios ELEGANT / plain and GRPO / plain.

For the flow models (every family but ``sd15`` / ``sdxl``) the sampler is the exact flow transitions at ``--eta`` (default 1.0); FLUX has no
classifier-free guidance (one transformer call per sample and step; ``--guidance_scale`` is its guidance
embedding).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
import traceback

import torch
from model_shapes import RESOLUTION, SHAPE_OPTIONS, TINY_OPTIONS, build_pipeline
from finetuner_baselines import policy_gradient_epoch
from step_cost import one_iteration  # same iteration as the step-cost benchmark (benchmarks/ is on sys.path)
from torch.utils.flop_counter import FlopCounterMode

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.core.control import lora_parameters
from hf_control_ft.rewards.image_rewards import BrightnessReward

PROMPTS = ["a photo of a cat", "a red car in the rain", "the mountains at dawn", "a bowl of fruit"]


def shape_options(args) -> dict:
    """Size options of the process: the square ``--resolution``, or a family's own shape (Wan: 480x832, 33 frames);
    ``--tiny``: the test pipelines' sizes."""
    options = dict(height=args.resolution, width=args.resolution)
    if args.tiny:
        options.update({} if args.model == "sd15" else {"max_sequence_length": 16}, **TINY_OPTIONS.get(args.model, {}))
    elif not args.resolution_given:
        options.update(SHAPE_OPTIONS.get(args.model, {}))
    return options


def build(args, batch_size: int, plain: bool):
    pipe = build_pipeline(args.model, args.tiny, args.device).to(args.device)
    objective = "pathwise" if plain else args.drift_objective
    cfg = ElegantConfig(alpha=1.0, eta=args.eta, num_inference_steps=args.steps, learn_initial_noise=not plain,
                        batch_size=batch_size, report_to=None, lora_rank=args.lora_rank, gradient_checkpointing=True,
                        truncate_backprop_steps=args.truncate, noise_num_steps=args.noise_steps, aux_hidden=32,
                        drift_objective=objective,
                        train_timestep_fraction=1.0 if objective == "pathwise" else args.train_timestep_fraction,
                        value_num_rollouts=2, step_value_train_steps=5)  # value-guided: a token fit (warm-up)
    trainer = ElegantTrainer.from_pipeline(pipe, BrightnessReward(), cfg, prompts=PROMPTS,
                                           guidance_scale=args.guidance_scale,
                                           mixed_precision="no" if args.dtype == "fp32" else args.dtype,
                                           kl_precision=args.kl_precision,
                                           **shape_options(args))
    params = lora_parameters(trainer.model)
    return trainer, params, torch.optim.AdamW(params, lr=1e-4)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def grpo_update(trainer, params, opt, batch_size: int) -> None:
    """One GRPO-style update over ``batch_size`` samples of the trainer's prompts (one group)."""
    gen = torch.Generator().manual_seed(0)
    trainer.process.prepare_batch(batch_size, gen)
    kept = [p.detach().clone() for p in params]  # a group of 1 has no spread: its update is NaN, timed all the same
    policy_gradient_epoch(trainer.sampler, opt, lambda x: trainer._reward(x, require_grad=False),
                          trainer.sample_shape, batch_size, gen, "grpo", group_size=batch_size, updates_per_epoch=1)
    with torch.no_grad():
        for p, k in zip(params, kept):
            p.copy_(k)


def count_flops(trainer, params, opt, plain) -> tuple[int, int]:
    """``(unet, total)`` FLOPs of one iteration (checkpoint recomputation and backward included)."""
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        one_iteration(trainer, params, opt, plain)
    counts = counter.get_flop_counts()
    key = f"{type(trainer.process.model).__name__}.unet"  # the UNet / transformer inside the guidance wrapper
    if key not in counts:
        raise RuntimeError(f"FlopCounterMode saw no {key} module; keys: {sorted(counts)[:10]}")
    return int(sum(counts[key].values())), int(counter.get_total_flops())


def measure(args, batch_size: int, mode: str) -> dict:
    """``mode``: ``"elegant"``, ``"plain"`` (reward backprop) or ``"grpo"``."""
    gc.collect()  # the previous mode's pipeline (trainers hold reference cycles) must not count in this one's peak
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    plain = mode != "elegant"
    t_build = time.perf_counter()
    trainer, params, opt = build(args, batch_size, plain)
    sync(args.device)
    t_build = time.perf_counter() - t_build

    def step():
        if mode == "grpo":
            grpo_update(trainer, params, opt, batch_size)
        else:
            one_iteration(trainer, params, opt, plain)

    t_first = time.perf_counter()
    step()  # warm-up
    sync(args.device)
    t_first = time.perf_counter() - t_first
    progress(args, batch_size, mode, build_s=round(t_build, 2), first_iteration_s=round(t_first, 2))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    flops, flops_error = None, None
    if args.count_flops and mode != "grpo":
        try:
            flops = count_flops(trainer, params, opt, plain)
        except RuntimeError as err:  # value_guided: the module tracker cannot follow the values' autograd.grad
            flops_error = str(err).splitlines()[0][:200]
    out = {"seconds_per_iteration": round(seconds, 4), "seconds_per_sample": round(seconds / batch_size, 4),
           "peak_gpu_memory_gib": None if peak is None else round(peak, 2), "build_s": round(t_build, 2),
           "first_iteration_s": round(t_first, 2)}
    if flops_error:
        out["flops_not_counted"] = flops_error
    if flops is not None:
        unet, total = flops
        out.update({"unet_tflop_per_iteration": float(f"{unet / 1e12:.4g}"),
                    "total_tflop_per_iteration": float(f"{total / 1e12:.4g}"),
                    "achieved_unet_tflops": float(f"{unet / seconds / 1e12:.4g}")})
    progress(args, batch_size, mode, **out)
    del trainer, params, opt
    return out


def progress(args, batch_size: int, mode: str, **figures) -> None:
    """One ``{"partial": ...}`` JSON line on stdout as soon as a mode is built and warm, then measured: a family
    cut off by ``--time_limit`` still reports what it finished (``run_families`` collects these lines)."""
    print(json.dumps({"partial": {"model": args.model, "batch_size": batch_size, "mode": mode, **figures}}),
          flush=True)


REAL_STEPS = {"sd15": 50, "sdxl": 40, "sd3": 28, "flux": 28, "qwen-image": 30, "flux2-klein": 28, "z-image": 30,
              "wan": 30}
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "sd3": 4.5, "flux": 3.5, "qwen-image": 4.0, "flux2-klein": 4.0, "z-image": 4.0,
            "wan": 5.0}


def run_families(args) -> None:
    """``--models``: one process per family, each with ``--time_limit``; JSON lines appended as measured."""
    forwarded = ["--eta", str(args.eta), "--dtype", args.dtype, "--batch_sizes", *map(str, args.batch_sizes),
                 "--lora_rank", str(args.lora_rank), "--kl_precision", args.kl_precision,
                 "--noise_steps", str(args.noise_steps), "--repeats", str(args.repeats), "--device", args.device,
                 "--drift_objective", args.drift_objective,
                 "--train_timestep_fraction", str(args.train_timestep_fraction)]
    for flag in ("steps", "resolution", "guidance_scale", "truncate"):
        if getattr(args, flag) is not None:
            forwarded += [f"--{flag}", str(getattr(args, flag))]
    forwarded += (["--tiny"] if args.tiny else []) + ([] if args.count_flops else ["--no_flops"])
    forwarded += ["--stack_every", str(args.stack_every)] if args.stack_every else []
    for model in args.models:
        cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--compact", *forwarded]
        try:  # with --stack_every the child's stderr (its stacks) goes straight to ours
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if args.stack_every else subprocess.PIPE,
                                  text=True, timeout=args.time_limit)
            lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            final = [r for r in lines if "partial" not in r]
            record = final[-1] if done.returncode == 0 and final else {
                "model": model, "error": ((done.stderr or "").strip().splitlines() or ["see stderr"])[-1],
                **_partial(lines)}
        except subprocess.TimeoutExpired as timed_out:
            stdout = timed_out.stdout or b""
            stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
            lines = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"partial"')]
            record = {"model": model, "timed_out": True, "time_limit_s": args.time_limit, **_partial(lines)}
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def dump_stacks_every(seconds: float) -> None:
    """``--stack_every``: a daemon thread prints the main thread's innermost frames to stderr every ``seconds``
    (where a family that does not finish spends its time; torch's module-call wrappers left out)."""
    main_id, t0 = threading.main_thread().ident, time.perf_counter()

    def loop():
        while True:
            time.sleep(seconds)
            frames = [f for f in traceback.extract_stack(sys._current_frames().get(main_id))
                      if "torch/nn/modules/module.py" not in f.filename]
            lines = [f"  {f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-12:]]
            print(f"--- {time.perf_counter() - t0:.0f} s", *lines, sep="\n", file=sys.stderr, flush=True)

    threading.Thread(target=loop, daemon=True).start()


def _partial(lines: list[dict]) -> dict:
    """``{"partial": [...]}`` from a cut-off family's progress lines (nothing when it printed none)."""
    partial = [r["partial"] for r in lines if "partial" in r]
    return {"partial": partial} if partial else {}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(RESOLUTION), default="sd15")
    p.add_argument("--models", nargs="+", choices=sorted(RESOLUTION), default=None,
                   help="several families, each in its own process (see --time_limit, --output)")
    p.add_argument("--time_limit", type=float, default=600.0, help="seconds per family with --models")
    p.add_argument("--output", default=None, help="with --models: append one JSON line per family here")
    p.add_argument("--compact", action="store_true", help="print the result as one JSON line")
    p.add_argument("--tiny", action="store_true", help="tiny random pipeline on CPU (smoke test)")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=None, help=f"default: the family's {REAL_STEPS}")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's (512 / 1024; Wan 480x832)")
    p.add_argument("--guidance_scale", type=float, default=None, help=f"default: the family's {GUIDANCE}")
    p.add_argument("--truncate", type=int, default=None, help="truncate backprop to the last N steps")
    p.add_argument("--noise_steps", type=int, default=20, help="Euler steps of the initial-noise model")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lora_rank", type=int, default=4)
    p.add_argument("--kl_precision", choices=["fp32", "upcast", "autocast", "delta"], default="fp32",
                   help="'upcast': frozen network in --dtype, KL passes in fp32 arithmetic (half the weight memory)")
    p.add_argument("--drift_objective", choices=["pathwise", "adjoint_matching", "value_guided"], default="pathwise",
                   help="the ELEGANT iteration's objective (value_guided: its per-step values fitted on 2 rollouts in "
                        "the warm-up, a token fit: only the iteration's cost is measured)")
    p.add_argument("--train_timestep_fraction", type=float, default=1.0,
                   help="adjoint_matching / value_guided: fraction of the steps trained per iteration")
    p.add_argument("--no_flops", dest="count_flops", action="store_false")
    p.add_argument("--stack_every", type=float, default=None,
                   help="print the main thread's stack to stderr every S seconds (where a slow family spends time)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.device == "cuda":
        # measured on an H200 with torch 2.11: cuDNN attention's backward failed at FLUX.1-dev shapes
        # ("mha_graph.execute(...) is_good()"); flash / memory-efficient attention are used instead
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.models:
        return run_families(args)
    if args.stack_every:
        dump_stacks_every(args.stack_every)
    args.steps = args.steps or REAL_STEPS[args.model]
    args.resolution_given = args.resolution is not None
    args.resolution = args.resolution or RESOLUTION[args.model]
    if args.guidance_scale is None:
        args.guidance_scale = GUIDANCE[args.model]
    if args.tiny:
        args.device, args.resolution = "cpu", 16
        args.steps = min(args.steps, 4)
        args.batch_sizes = [b for b in args.batch_sizes if b <= 2] or [1]
        args.dtype = "fp32" if args.dtype == "fp16" else args.dtype  # CPU autocast: bf16 or none
        args.repeats = 1
    results = []
    for b in args.batch_sizes:
        elegant, plain, grpo = (measure(args, b, mode) for mode in ("elegant", "plain", "grpo"))
        results.append({"batch_size": b, "elegant": elegant, "plain_reward_backprop": plain, "grpo_update": grpo,
                        "time_ratio": round(elegant["seconds_per_iteration"] / plain["seconds_per_iteration"], 3),
                        "grpo_time_ratio": round(grpo["seconds_per_iteration"] / plain["seconds_per_iteration"], 3)})
    print(json.dumps({"benchmark": "sd_step", "model": f"tiny-random-{args.model}" if args.tiny
                      else f"{args.model}-shaped-random",
                      "device": args.device,
                      "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                      "dtype": args.dtype, "resolution": args.resolution, "shape": shape_options(args),
                      "steps": args.steps, "eta": args.eta,
                      "guidance_scale": args.guidance_scale, "gradient_checkpointing": True,
                      "lora_rank": args.lora_rank, "kl_precision": args.kl_precision,
                      "truncate_backprop_steps": args.truncate, "drift_objective": args.drift_objective,
                      "train_timestep_fraction": args.train_timestep_fraction, "results": results}, indent=None if args.compact else 1))


if __name__ == "__main__":
    main()
