"""``benchmarks/tilted_target.py --conditional``: per-prompt exact targets of a class-conditional mixture, and the
cost of a conditional start law on the tiny Stable Diffusion pipeline (see ``tilted_target.py``'s docstring)."""

from __future__ import annotations

import json
import sys
import time

import torch
from diffusers import DDIMScheduler
from tilted_cases import evaluate, load_denoiser

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.processes import ClassConditionalProcess
from hf_control_ft.tasks.gaussian_mixture import class_conditional_mixtures, distill_mixture_denoiser


def run_conditional(args) -> dict:
    """The per-prompt exact-target comparison of ``--conditional`` (module docstring)."""
    mixtures = class_conditional_mixtures()
    train_probs, embeddings = None, None
    if args.held_out_prompt:
        # a fourth prompt the pretrained model knows but fine-tuning never draws; conditions are the prompts'
        # mode-weight vectors (a stand-in for semantic embeddings: close prompts, close vectors)
        mixtures.append(type(mixtures[0])([0.35, 0.45, 0.20], mixtures[0].means, mixtures[0].covariances))
        train_probs = [1.0, 1.0, 1.0, 0.0]
        embeddings = torch.stack([m.weights.float() for m in mixtures])
    n_train = 3
    c = torch.tensor([0.5, 0.3])
    alpha = 2.0 if args.alpha is None else args.alpha
    targets = [m.tilted_linear(c, alpha) for m in mixtures]

    def linear_reward(x):
        return x @ c.to(x)

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    t0 = time.perf_counter()
    den = distill_mixture_denoiser(mixtures, scheduler, steps=args.distill_steps, seed=args.seed)
    state = {"config": {k: v for k, v in dict(den.config).items() if not k.startswith("_")},
             "weights": den.state_dict()}
    result = {"benchmark": "tilted_target --conditional", "alpha": alpha, "eta": args.low_eta,
              "num_inference_steps": args.steps, "drift_objective": args.drift_objectives.split(",")[0],
              "pretrained_weights": [m.weights.tolist() for m in mixtures],
              "target_weights": [[round(float(w), 4) for w in t.weights] for t in targets],
              "distill_seconds": round(time.perf_counter() - t0, 1), "variants": {}}
    variants = {"conditional": dict(learn_initial_noise=True, conditional_initial_noise=True),
                "prompt_agnostic": dict(learn_initial_noise=True, conditional_initial_noise=False),
                "fixed_noise": dict(learn_initial_noise=False)}
    # stages 1-2 get the unconditional benchmark's budget per prompt: value rollouts and initial-noise steps scale
    # with the number of prompts (the start law of each prompt is learned from its share)
    result["value_num_rollouts"] = args.value_rollouts * n_train
    result["noise_train_steps"] = args.noise_train_steps * n_train
    result["held_out_prompts"] = [3] if args.held_out_prompt else []
    for name, kw in variants.items():
        if name not in args.variants.split(","):
            continue
        model = load_denoiser(state)
        cfg = ElegantConfig(alpha=alpha, eta=args.low_eta, num_inference_steps=args.steps,
                            train_steps=args.train_steps, batch_size=args.batch_size, learning_rate=args.lr,
                            lora_rank=8, seed=args.seed, value_num_rollouts=result["value_num_rollouts"],
                            value_train_steps=args.value_train_steps, noise_train_steps=result["noise_train_steps"],
                            report_to=None, drift_objective=result["drift_objective"], **kw)
        process = ClassConditionalProcess(model, scheduler, (2,), cfg, num_classes=len(mixtures),
                                          class_probs=train_probs, class_embeddings=embeddings)
        trainer = ElegantTrainer(cfg, reward_fn=linear_reward, process=process)
        t1 = time.perf_counter()
        trainer.train()
        per_prompt = {}
        for label, target in enumerate(targets):
            x = trainer.sample(prompts=torch.full((args.eval_samples,), label), batch_size=2048,
                               generator=torch.Generator().manual_seed(99 + label))
            per_prompt[f"prompt_{label}"] = evaluate(target, x)
            if name == "conditional":
                x0 = trainer.sample(prompts=torch.full((args.eval_samples,), label), batch_size=2048,
                                    generator=torch.Generator().manual_seed(99 + label), controlled=False)
                per_prompt[f"prompt_{label}"]["pretrained_tv"] = round(target.mode_weight_tv(x0), 4)
        result["variants"][name] = {"train_seconds": round(time.perf_counter() - t1, 1), "per_prompt": per_prompt,
                                    "worst_tv": max(per_prompt[f"prompt_{i}"]["tv"] for i in range(n_train))}
        print(json.dumps({name: result["variants"][name]}), file=sys.stderr, flush=True)
    if not args.skip_sd_cost:
        result["sd_stage_cost"] = {name: _sd_stage_cost(flag) for name, flag in
                                   (("conditional", True), ("prompt_agnostic", False))}
    return result


def _sd_stage_cost(conditional: bool) -> dict:
    """Seconds and peak RSS of stages 1-2 on the tiny SD pipeline, measured in a fresh process."""
    code = f"""
import json, resource, time, torch
from diffusers import StableDiffusionPipeline
from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.testing import tiny_components
torch.set_num_threads(1)
cfg = ElegantConfig(num_inference_steps=10, batch_size=8, value_num_rollouts=64, value_train_steps=100,
                    noise_train_steps=50, noise_batch_size=16, aux_hidden=32, report_to=None,
                    conditional_initial_noise={conditional})
prompts = ["a cat", "the dog", "a red car", "a bowl of fruit", "the sea", "a tree"]
trainer = ElegantTrainer.from_pipeline(StableDiffusionPipeline(**tiny_components()),
                                       lambda im, p: im.mean((1, 2, 3)), cfg, prompts=prompts)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
trainer.fit_value_function()
t1 = time.perf_counter()
trainer.train_initial_noise()
t2 = time.perf_counter()
print(json.dumps({{"stage1_seconds": t1 - t0, "stage2_seconds": t2 - t1,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_stages_mb": before / 1024,
                  "noise_model_parameters": sum(p.numel() for p in trainer.initial_noise.parameters())}}))
"""
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
