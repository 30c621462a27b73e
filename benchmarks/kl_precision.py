"""Precision of the per-step KL and its LoRA gradient under every precision mode the library offers, as JSON.

The KL of a step is ``||mu_ft - mu_pre||^2 / (2 sigma^2)``: a squared difference of two UNet outputs, times the
guidance scale squared. Under half-precision autocast both outputs carry rounding noise and the KL gets a floor
that does not shrink with the control. For each mode, guidance scale and LoRA size (every ``B`` matrix set to
``scale * N(0, 1)``) this prints the mean path KL per sample and the norm of its LoRA gradient (the drift
stage's backward sweep with the KL alone), each as a ratio to fp32, and the seconds per KL + gradient
evaluation.

Modes: ``fp32``; ``fp16`` / ``bf16`` (``mixed_precision``, default ``kl_precision="fp32"``: UNet calls that feed
a KL run in fp32, the rest under autocast); ``fp16-upcast`` / ``bf16-upcast`` (``kl_precision="upcast"``: UNet
weights in the half dtype, the calls that feed a KL in fp32 arithmetic layer by layer); ``fp16-autocast`` /
``bf16-autocast`` (``kl_precision="autocast"``: every UNet call in the half dtype); ``fp16-tf32-emulated`` /
``bf16-tf32-emulated`` (``kl_precision="tf32"`` as a GPU computes it: the upcast modes with the inputs of every
linear and convolution layer rounded to TF32's 10-bit mantissa, on any device; attention's own products are not
rounded); ``fp16-delta`` / ``bf16-delta`` (``kl_precision="delta"``: half-precision weights and passes, the
KL's difference carried through one pass by difference propagation); where a CUDA device is present also ``tf32`` (fp32 with TF32 matmuls) and ``bf16-tf32`` (the real
``kl_precision="tf32"``). Each record also gives the bytes of the frozen UNet weights.

    python benchmarks/kl_precision.py                         # tiny SD + SD-1.5-shaped UNet (CPU: ~40 min)
    python benchmarks/kl_precision.py --models tiny           # tiny SD only (~1 min)
    python benchmarks/kl_precision.py --models sd15 --modes fp32 bf16-upcast bf16-tf32-emulated

The last stdout line is one JSON object: ``{"records": [...], "summary": {...}}``; ``summary`` gives, per mode,
the worst KL and gradient ratio over the settings whose fp32 KL per sample is >= 0.1 nats (the goal: within
10%) and the floor (the KL at the smallest control); for the upcast and tf32 modes also the worst error against
the exact KL of the same stored half-precision weights, computed in fp32 arithmetic (``*_same_weights``) and in
fp64 arithmetic (``*_fp64``; the goal: within 1%).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import StableDiffusionPipeline

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.testing import kl_and_gradient, scale_lora, sd15_components, tiny_components

PROMPTS = ["a photo of a cat", "a red car in the rain"]
MODES = {  # name -> (mixed_precision, kl_precision)
    "fp32": ("no", "fp32"),
    "fp16": ("fp16", "fp32"),
    "bf16": ("bf16", "fp32"),
    "fp16-upcast": ("fp16", "upcast"),
    "bf16-upcast": ("bf16", "upcast"),
    "fp16-autocast": ("fp16", "autocast"),
    "bf16-autocast": ("bf16", "autocast"),
    "fp16-tf32-emulated": ("fp16", "tf32"),
    "bf16-tf32-emulated": ("bf16", "tf32"),
    "fp16-delta": ("fp16", "delta"),
    "bf16-delta": ("bf16", "delta"),
}
CUDA_MODES = {"tf32": ("no", "fp32"), "bf16-tf32": ("bf16", "tf32")}


def build(model: str, mode: str, guidance: float, steps: int, resolution: int | None, device: str,
          same_weights: bool = False, fp64: bool = False):
    """The trainer of one mode; ``same_weights``: the mode's half-precision UNet values held in fp32 and run in
    fp32 arithmetic (``kl_precision="fp32"``): the exact KL of the model that mode stores; ``fp64`` (an upcast or
    tf32 mode): the same stored weights with the KL passes in fp64 arithmetic."""
    mixed, kl_precision = {**MODES, **CUDA_MODES}[mode]
    pipe = StableDiffusionPipeline(**(tiny_components() if model == "tiny" else sd15_components())).to(device)
    if same_weights:
        pipe.unet.to({"fp16": torch.float16, "bf16": torch.bfloat16}[mixed]).to(torch.float32)
        kl_precision = "fp32"
    cfg = ElegantConfig(alpha=1.0, eta=1.0, num_inference_steps=steps, learn_initial_noise=False, batch_size=2,
                        report_to=None, lora_rank=4, gradient_checkpointing=model != "tiny")
    trainer = ElegantTrainer.from_pipeline(pipe, None, cfg, prompts=PROMPTS, guidance_scale=guidance,
                                           mixed_precision=mixed, kl_precision=kl_precision, height=resolution,
                                           width=resolution)
    if mode.endswith("-tf32-emulated") and not same_weights and not fp64:
        trainer.process.model.upcast.emulate_tf32 = True
    if fp64:  # the same stored half-precision weights, the KL passes in fp64 arithmetic (the reference)
        trainer.process.model.upcast.dtype = torch.float64
    return trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--scales", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--guidance_scales", nargs="+", type=float, default=[1.0, 7.5])
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: tiny 10, sd15 2)")
    parser.add_argument("--sd15_resolution", type=int, default=64, help="image size of the SD-1.5-shaped runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", default=None, choices=[*MODES, *CUDA_MODES],
                        help="default: every mode the device has (fp32, the reference, always runs first)")
    args = parser.parse_args()
    modes = args.modes or list(MODES) + (list(CUDA_MODES) if args.device == "cuda" else [])
    modes = ["fp32"] + [m for m in modes if m != "fp32"]
    records = []
    for model in args.models:
        steps = args.steps or (10 if model == "tiny" else 2)
        resolution = None if model == "tiny" else args.sd15_resolution
        for guidance in args.guidance_scales:
            reference = {}
            for mode in modes:
                torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
                torch.backends.cudnn.allow_tf32 = mode == "tf32"
                trainer = build(model, mode, guidance, steps, resolution, args.device)
                half = mode.endswith(("-upcast", "-tf32-emulated", "-tf32"))
                exact = build(model, mode, guidance, steps, resolution, args.device, same_weights=True) \
                    if half else None
                exact64 = build(model, mode, guidance, steps, resolution, args.device, fp64=True) if half else None
                unet_bytes = sum(p.numel() * p.element_size() for n, p in trainer.process.lora_model.named_parameters()
                                 if "lora" not in n)
                for i, scale in enumerate(args.scales):
                    scale_lora(trainer.process.lora_model, scale)
                    if i == 0:
                        kl_and_gradient(trainer)  # warm-up (allocations), once per mode
                    t0 = time.perf_counter()
                    kl, grad = kl_and_gradient(trainer)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - t0
                    if mode == "fp32":
                        reference[scale] = (kl, grad)
                    kl32, grad32 = reference[scale]
                    rec = {"model": model, "mode": mode, "guidance_scale": guidance, "lora_scale": scale,
                           "steps": steps, "kl": kl, "grad_norm": grad, "kl_fp32": kl32, "grad_norm_fp32": grad32,
                           "kl_ratio": kl / kl32 if kl32 > 0 else None,
                           "grad_ratio": grad / grad32 if grad32 > 0 else None, "seconds": seconds,
                           "frozen_unet_bytes": unet_bytes}
                    if exact is not None:  # against the exact KL of the same stored half-precision weights
                        scale_lora(exact.process.lora_model, scale)
                        kl_same, grad_same = kl_and_gradient(exact)
                        rec.update(kl_same_weights=kl_same, grad_same_weights=grad_same,
                                   kl_error_same_weights=abs(kl / kl_same - 1) if kl_same > 0 else None,
                                   grad_error_same_weights=abs(grad / grad_same - 1) if grad_same > 0 else None)
                        scale_lora(exact64.process.lora_model, scale)
                        kl64, grad64 = kl_and_gradient(exact64)
                        rec.update(kl_fp64=kl64, grad_fp64=grad64, kl_error_fp64=abs(kl / kl64 - 1),
                                   grad_error_fp64=abs(grad / grad64 - 1))
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
                del trainer, exact, exact64
    summary = {}
    for model in args.models:
        for mode in modes:
            rows = [r for r in records if r["model"] == model and r["mode"] == mode]
            at_op = [r for r in rows if r["kl_fp32"] >= 0.1]
            smallest = min(rows, key=lambda r: r["lora_scale"])
            t32 = sum(r["seconds"] for r in records if r["model"] == model and r["mode"] == "fp32")
            summary[f"{model}/{mode}"] = {
                "worst_kl_error": max((abs(r["kl_ratio"] - 1) for r in at_op), default=None),
                "worst_grad_error": max((abs(r["grad_ratio"] - 1) for r in at_op), default=None),
                "kl_floor_at_smallest_scale": {str(r["guidance_scale"]): r["kl"] for r in rows
                                               if r["lora_scale"] == smallest["lora_scale"]},
                "time_vs_fp32": sum(r["seconds"] for r in rows) / t32,
                "frozen_unet_bytes": rows[0]["frozen_unet_bytes"],
            }
            same = [r for r in at_op if "kl_error_same_weights" in r]
            if same:  # upcast / tf32: against the exact KL of its own stored weights
                summary[f"{model}/{mode}"].update(
                    worst_kl_error_same_weights=max(r["kl_error_same_weights"] for r in same),
                    worst_grad_error_same_weights=max(r["grad_error_same_weights"] for r in same),
                    worst_kl_error_fp64=max(r["kl_error_fp64"] for r in same),
                    worst_grad_error_fp64=max(r["grad_error_fp64"] for r in same))
    print(json.dumps({"records": records, "summary": summary}))


if __name__ == "__main__":
    main()
