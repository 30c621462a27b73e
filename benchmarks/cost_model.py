"""What a preset's run costs before it runs: memory, network work by kind and precision, GPU-hours. Prints JSON.

Everything is counted on the meta device (no memory, no download, seconds on a CPU) at each family's real shapes:

* **parameters and host memory**: every component of the family at its published size (the denoiser of
  ``benchmarks/model_shapes.py``, the real text encoders -- CLIP ViT-L, OpenCLIP bigG, T5-XXL, Qwen2.5-VL-7B, Qwen3-4B,
  UMT5-XXL -- and the VAE), in the dtypes the scripts load them in (``processes/options.py::load_dtype`` of the
  preset's precision); the host peak is their sum (diffusers loads every component before moving it);
* **FLOPs of one denoiser evaluation** (``torch.utils.flop_counter``) at the preset's resolution, batch 1, with the
  family's guidance (classifier-free guidance doubles it, FLUX's guidance embedding does not);
* **GPU memory of training**: the resident weights (the denoiser and the VAE; the text encoders too unless the preset
  pre-computes the prompt embeddings), the LoRA with its gradient and Adam moments, and the peak of tensors created
  during one drift step's backward -- a fine-tuned and a pretrained pass through the denoiser with gradient
  checkpointing, the preset's batch -- measured by a dispatch-mode tracker on meta tensors, plus the VAE decoder's
  backward (the reward's gradient reaches the latents through it) at batch 1; the reward model is not counted, and
  attention is counted as the math kernel holds it on the meta device (its score matrix: an upper bound where a
  GPU's flash attention runs);
* **passes of one drift iteration by kind** for each objective (``trainers/costs.py::iteration_passes``), and the
  run's FLOPs by precision: the rollouts in bf16, the KL passes in fp32 arithmetic (``kl_precision`` ``fp32`` /
  ``upcast``), a backward counted as one forward's FLOPs (activation gradients; the frozen weights get none) plus the
  recompute of gradient checkpointing; the ``bf16_kl_*`` columns price the same passes all with bf16 products
  (``kl_precision="delta"``, the presets' exact mode, whose fp32 elementwise work is not counted, and ``"autocast"``,
  what GRPO-style trainers run), whose training points ``benchmarks/elegant_objective.py --kl_passes delta|bf16``
  measure;
* **GPU-hours**, an estimate: bf16 work at ``--bf16_tflops`` sustained (default 400, 40 % of an H100 / H200's dense
  peak, an assumption), fp32-arithmetic work at the rate the only GPU measurement so far implies (:data:`MEASURED`:
  SD 1.5 512 px / 50 steps, batch 1, ``--kl_precision upcast``, pathwise: one ELEGANT iteration in 49.9 s on an
  H200, ``docs/text_to_image.md``; the model's fp32 FLOPs of that iteration over its seconds less its bf16 part), or
  ``--fp32_tflops``. Not a measurement: ``benchmarks/sd_step.py`` measures when a GPU is lent.

    python benchmarks/cost_model.py                        # every preset, pathwise / adjoint_matching / value_guided
    python benchmarks/cost_model.py --families sd15 flux --train_timestep_fraction 0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_control_ft import ElegantConfig  # noqa: E402
from hf_control_ft.scripts.presets import PRESETS  # noqa: E402
from hf_control_ft.trainers.costs import BF16_TFLOPS, iteration_passes, modelled_seconds  # noqa: E402

GIB = 2**30
#: the one GPU measurement of an ELEGANT iteration so far (docs/text_to_image.md): it sets the fp32-arithmetic rate
MEASURED = {"family": "sd15", "seconds": 49.9, "batch": 1, "steps": 50, "kl_precision": "upcast", "device": "H200"}
OBJECTIVES = ("pathwise", "adjoint_matching", "value_guided")
#: classifier-free guidance: two denoiser evaluations per step (FLUX.1's guidance embedding: one)
GUIDANCE_FACTOR = {"sd15": 2, "sdxl": 2, "sd3": 2, "flux": 1, "qwen-image": 2, "flux2-klein": 2, "z-image": 2,
                   "wan": 2}
#: the text tokens a prompt gives the denoiser (padded lengths; Qwen-Image and Z-Image keep a prompt's valid tokens)
TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "sd3": 333, "flux": 512, "qwen-image": 64, "flux2-klein": 512,
               "z-image": 64, "wan": 512}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors created while active (activations, gradients, temporaries), on any device
    including meta: each storage is counted once, from its first tensor's creation to its last tensor's release."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _release(self, key) -> None:
        count, size = self.live[key]
        if count == 1:
            del self.live[key]
            self.current -= size
        else:
            self.live[key] = (count - 1, size)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self.live:
                    count, size = self.live[key]
                    self.live[key] = (count + 1, size)
                else:
                    size = storage.nbytes()
                    self.live[key] = (1, size)
                    self.current += size
                    self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._release, key)
        return out


# ------------------------------------------------------------------------------------------- components
def _t5_xxl(vocab=32128, umt5=False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cls, cfg = (UMT5EncoderModel, UMT5Config) if umt5 else (T5EncoderModel, T5Config)
    return cls(cfg(vocab_size=vocab, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   feed_forward_proj="gated-gelu"))


def _qwen3_4b():
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                  tie_word_embeddings=True))


def _qwen25_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                     "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584},
        vocab_size=152064)
    return Qwen2_5_VLForConditionalGeneration(config)


def text_encoders(family: str) -> dict:
    from model_shapes import _clip  # CLIP text encoders of the real widths (MLP 4x), as the pipelines there use

    clip_l = lambda: _clip(768, 12, 12, 768, False)  # noqa: E731
    big_g = lambda: _clip(1280, 32, 20, 1280, True)  # noqa: E731
    return {"sd15": {"clip_l": clip_l}, "sdxl": {"clip_l": clip_l, "openclip_bigG": big_g},
            "sd3": {"clip_l": lambda: _clip(768, 12, 12, 768, True), "openclip_bigG": big_g,
                    "t5_xxl": _t5_xxl},
            "flux": {"clip_l": clip_l, "t5_xxl": _t5_xxl}, "qwen-image": {"qwen2.5_vl_7b": _qwen25_vl_7b},
            "flux2-klein": {"qwen3_4b": _qwen3_4b}, "z-image": {"qwen3_4b": _qwen3_4b},
            "wan": {"umt5_xxl": lambda: _t5_xxl(vocab=256384, umt5=True)}}[family]


def pipeline_parts(family: str):
    """``(denoiser, vae)`` at the real shapes (random weights; under the caller's meta device)."""
    import model_shapes

    from hf_control_ft import testing

    if family == "sd15":
        parts = testing.sd15_components()
        return parts["unet"], parts["vae"]
    denoiser = {"sdxl": model_shapes.sdxl_unet, "sd3": model_shapes.sd3_transformer}.get(
        family, lambda: model_shapes.denoiser(family))()
    return denoiser, model_shapes.vae(family)


def denoiser_inputs(family: str, B: int, size) -> dict:
    """Keyword arguments of one conditional denoiser call, batch ``B``, at ``size`` (height, width[, frames])."""
    h, w = size[0] // 8, size[1] // 8
    L = TEXT_TOKENS[family]
    t = torch.full((B,), 500.0)
    if family == "sd15":
        return dict(sample=torch.randn(B, 4, h, w), timestep=t, encoder_hidden_states=torch.randn(B, L, 768))
    if family == "sdxl":
        return dict(sample=torch.randn(B, 4, h, w), timestep=t, encoder_hidden_states=torch.randn(B, L, 2048),
                    added_cond_kwargs={"text_embeds": torch.randn(B, 1280), "time_ids": torch.randn(B, 6)})
    if family == "sd3":
        return dict(hidden_states=torch.randn(B, 16, h, w), timestep=t, encoder_hidden_states=torch.randn(B, L, 4096),
                    pooled_projections=torch.randn(B, 2048))
    if family == "flux":
        n = (h // 2) * (w // 2)
        return dict(hidden_states=torch.randn(B, n, 64), encoder_hidden_states=torch.randn(B, L, 4096),
                    pooled_projections=torch.randn(B, 768), timestep=t / 1000, img_ids=torch.zeros(n, 3),
                    txt_ids=torch.zeros(L, 3), guidance=torch.full((B,), 3.5))
    if family == "qwen-image":
        n = (h // 2) * (w // 2)
        return dict(hidden_states=torch.randn(B, n, 64), encoder_hidden_states=torch.randn(B, L, 3584),
                    encoder_hidden_states_mask=torch.ones(B, L), timestep=t / 1000,
                    img_shapes=[[(1, h // 2, w // 2)]] * B)
    if family == "flux2-klein":
        from hf_control_ft.processes.flux2 import image_ids, position_ids

        h2, w2 = size[0] // 16, size[1] // 16
        return dict(hidden_states=torch.randn(B, h2 * w2, 128), encoder_hidden_states=torch.randn(B, L, 3 * 2560),
                    timestep=t / 1000, img_ids=image_ids(h2, w2, B, "meta"), txt_ids=position_ids(L, 3, B, "meta"))
    if family == "z-image":
        return dict(x=[torch.randn(16, 1, h, w) for _ in range(B)], t=t / 1000,
                    cap_feats=[torch.randn(L, 2560) for _ in range(B)])
    if family == "wan":
        frames = (size[2] - 1) // 4 + 1
        return dict(hidden_states=torch.randn(B, 16, frames, h, w), timestep=t,
                    encoder_hidden_states=torch.randn(B, L, 4096))
    raise KeyError(family)


def _output(out):
    if isinstance(out, tuple):
        out = out[0]
    out = getattr(out, "sample", out)
    return torch.stack([o for o in out]) if isinstance(out, list) else out


def _half(inputs: dict) -> dict:
    """The denoiser's activations in bf16 (positions, times and guidance stay fp32, as the pipelines pass them)."""
    def cast(k, v):
        if isinstance(v, list):
            return [cast(k, item) for item in v]
        keep = k in ("img_ids", "txt_ids", "timestep", "t", "guidance")
        return v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and not keep else v
    return {k: cast(k, v) for k, v in inputs.items()}


def preset_size(family: str):
    p = PRESETS[family]
    if family == "wan":
        return (p["height"], p["width"], p["num_frames"])
    return (p["resolution"], p["resolution"])


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bytes(n: int, dtype) -> int:
    return n * (torch.finfo(dtype).bits // 8)


def family_costs(family: str, objectives=OBJECTIVES, train_timestep_fraction: float = 1.0,
                 bf16_tflops: float = 400.0, fp32_tflops: float = 10.0) -> dict:
    from hf_control_ft.core.control import add_lora_control, lora_parameters
    from hf_control_ft.processes.options import load_dtype

    preset = PRESETS[family]
    kl_precision = preset.get("kl_precision", "fp32")
    dtypes = load_dtype(kl_precision, "bf16")  # the scripts' default mixed precision on a GPU
    size = preset_size(family)
    g = GUIDANCE_FACTOR[family]
    B = preset["batch_size"]
    torch.manual_seed(0)
    with torch.device("meta"):
        denoiser, vae = pipeline_parts(family)
        encoders = {name: build() for name, build in text_encoders(family).items()}
    counts = {"denoiser": _params(denoiser), "vae": _params(vae), **{k: _params(m) for k, m in encoders.items()}}
    weight_bytes = {"denoiser": _bytes(counts["denoiser"], dtypes["transformer"]),
                    **{k: _bytes(v, dtypes["default"]) for k, v in counts.items() if k != "denoiser"}}
    host_peak = sum(weight_bytes.values())

    tflop = evaluation_tflop(family)  # one guided evaluation, batch 1

    # one drift step's backward: the preset's batch (x guidance) through the fine-tuned and the pretrained network
    with torch.device("meta"):
        add_lora_control(denoiser, rank=preset["lora_rank"], target_modules=_default_targets(family, denoiser))
        batch_inputs = denoiser_inputs(family, B * g, size)
    denoiser.to(torch.bfloat16)
    for p in lora_parameters(denoiser):
        p.data = p.data.float()
    lora = sum(p.numel() for p in lora_parameters(denoiser))
    denoiser.enable_gradient_checkpointing()
    batch_inputs = _half(batch_inputs)
    tracker = PeakMemory()
    with tracker:
        fine_tuned = _output(denoiser(**batch_inputs)).float()
        denoiser.disable_adapters() if hasattr(denoiser, "disable_adapters") else None
        pretrained = _output(denoiser(**batch_inputs)).float()
        denoiser.enable_adapters() if hasattr(denoiser, "enable_adapters") else None
        (fine_tuned - pretrained).pow(2).sum().backward()
    step_peak = tracker.peak

    vae_peak = _vae_backward_peak(family, vae, size)
    resident = weight_bytes["denoiser"] + weight_bytes["vae"]
    if not preset.get("pre_compute_text_embeddings"):
        resident += sum(v for k, v in weight_bytes.items() if k not in ("denoiser", "vae"))
    lora_state = lora * 4 * 4  # fp32 weights, gradient, two Adam moments
    gpu_peak = resident + lora_state + max(step_peak, vae_peak)

    cfg = ElegantConfig.from_dict({k: v for k, v in preset.items() if k in {f.name for f in
                                                                           dataclasses.fields(ElegantConfig)}},
                                  report_to=None, checkpointing_steps=0)
    rows = {}
    for objective in objectives:
        fraction = train_timestep_fraction if objective != "pathwise" else 1.0
        c = dataclasses.replace(cfg, drift_objective=objective, train_timestep_fraction=fraction)
        passes = iteration_passes(c)
        samples = c.batch_size * c.gradient_accumulation_steps
        # "exact": the KL passes in fp32 arithmetic (kl_precision fp32 / upcast); "bf16": half-precision products,
        # which kl_precision "delta" (the presets') and "autocast" share (delta's fp32 elementwise work not counted)
        exact = modelled_seconds(c, tflop, True, bf16_tflops=bf16_tflops, fp32_tflops=fp32_tflops)
        half = modelled_seconds(c, tflop, False, bf16_tflops=bf16_tflops, fp32_tflops=fp32_tflops)
        fp32_iter = (passes["kl_forward"] + passes["backward"] + passes["recompute"]) * samples * tflop
        rows[objective] = {"passes_per_sample": passes,
                           "tflop_per_iteration_bf16": round((passes["rollout"] + passes["kl_forward"] + passes["backward"]
                                                              + passes["recompute"]) * samples * tflop - fp32_iter, 1),
                           "tflop_per_iteration_fp32": round(fp32_iter, 1),
                           "seconds_per_iteration": round(exact["iteration_s"], 2),
                           "iteration_over_sampling": round(exact["iteration_s"] / (samples * exact["sampling_s"]), 2),
                           "gpu_hours": round(exact["run_s"] / 3600, 2),
                           "bf16_kl_iteration_over_sampling": round(half["iteration_s"] / (samples * half["sampling_s"]),
                                                                    2),
                           "bf16_kl_gpu_hours": round(half["run_s"] / 3600, 2)}
    return {"family": family, "size": list(size), "steps": cfg.num_inference_steps, "batch": B,
            "accumulation": cfg.gradient_accumulation_steps, "train_steps": cfg.train_steps,
            "kl_precision": kl_precision, "guidance_factor": g,
            "parameters_billion": {k: round(v / 1e9, 3) for k, v in counts.items()},
            "host_peak_gib": round(host_peak / GIB, 1), "gpu_resident_weights_gib": round(resident / GIB, 1),
            "gpu_step_activations_gib": round(step_peak / GIB, 1), "gpu_vae_backward_gib": round(vae_peak / GIB, 1),
            "gpu_peak_gib": round(gpu_peak / GIB, 1), "tflop_per_evaluation": round(tflop, 2),
            "objectives": rows}


def _default_targets(family: str, denoiser) -> list[str]:
    """The family process's LoRA targets present in ``denoiser`` (SD: the attention projections)."""
    from hf_control_ft.processes import flux2, qwen_image, stable_diffusion_3, wan, z_image

    targets = {"sd15": ["to_q", "to_k", "to_v", "to_out.0"], "sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
               "sd3": stable_diffusion_3.SD3_TARGETS, "flux": stable_diffusion_3.SD3_TARGETS, "qwen-image": qwen_image.QWEN_IMAGE_TARGETS,
               "flux2-klein": flux2.FLUX2_TARGETS, "z-image": z_image.Z_IMAGE_TARGETS, "wan": wan.WAN_TARGETS}[family]
    names = [n for n, _ in denoiser.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def _vae_backward_peak(family: str, vae, size) -> int:
    """Peak bytes of decoding one latent with gradient to the latent (bf16; Wan's video VAE: its frames)."""
    h, w = size[0] // 8, size[1] // 8
    vae.to(torch.bfloat16)
    with torch.device("meta"):
        channels = vae.config.latent_channels if hasattr(vae.config, "latent_channels") else vae.config.z_dim
        shape = (1, channels, (size[2] - 1) // 4 + 1, h, w) if family in ("wan", "qwen-image") and len(size) == 3 \
            else (1, channels, 1, h, w) if family in ("wan", "qwen-image") else (1, channels, h, w)
        z = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    tracker = PeakMemory()
    with tracker:
        vae.decode(z).sample.float().mean().backward()
    return tracker.peak


def calibrated_fp32_tflops(bf16_tflops: float) -> float:
    """The fp32-arithmetic rate that makes the model's SD 1.5 iteration take :data:`MEASURED`'s seconds."""
    tflop = evaluation_tflop(MEASURED["family"])
    cfg = ElegantConfig(num_inference_steps=MEASURED["steps"], batch_size=MEASURED["batch"], drift_objective="pathwise",
                        report_to=None)
    passes = iteration_passes(cfg)
    bf16 = passes["rollout"] * tflop
    exact = (passes["kl_forward"] + passes["backward"] + passes["recompute"]) * tflop
    return exact / (MEASURED["seconds"] - bf16 / bf16_tflops)


def evaluation_tflop(family: str) -> float:
    """TFLOPs of one guided denoiser evaluation at the preset's size, batch 1."""
    torch.manual_seed(0)
    with torch.device("meta"):
        denoiser, _ = pipeline_parts(family)
        inputs = denoiser_inputs(family, 1, preset_size(family))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        _output(denoiser(**inputs))
    return counter.get_total_flops() / 1e12 * GUIDANCE_FACTOR[family]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(PRESETS))
    p.add_argument("--train_timestep_fraction", type=float, default=1.0)
    p.add_argument("--bf16_tflops", type=float, default=BF16_TFLOPS)
    p.add_argument("--fp32_tflops", type=float, default=None, help="default: calibrated on MEASURED")
    args = p.parse_args(argv)
    if args.fp32_tflops is None:
        args.fp32_tflops = calibrated_fp32_tflops(args.bf16_tflops)
    print(json.dumps({"bf16_tflops_assumed": args.bf16_tflops, "fp32_tflops": round(args.fp32_tflops, 2),
                      "fp32_from": MEASURED}), flush=True)
    for family in args.families:
        row = family_costs(family, train_timestep_fraction=args.train_timestep_fraction,
                           bf16_tflops=args.bf16_tflops, fp32_tflops=args.fp32_tflops)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
