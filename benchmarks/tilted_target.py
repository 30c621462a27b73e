"""Exact-target benchmark (docs/algorithms.md §5): does ELEGANT sample p_pre(x) exp(r(x)/alpha) / Z?

Pretrained law: a 2-D three-mode Gaussian mixture with unequal weights; the pretrained model is a small MLP
denoiser distilled to its exact noise prediction. Reward r(x) = c . x, whose tilted target is a mixture in
closed form. For the pretrained model, ELEGANT with each drift objective of ``--drift_objectives``
(``ElegantConfig.drift_objective``: "auto", "value_guided", "adjoint_matching", "pathwise"), and ELEGANT with
learn_initial_noise=False (first objective) it reports the total-variation distance between the samples' mode
weights and the target weights, and each mode's mean error, at eta = 1 and at a low-noise setting. It also
reports a discretisation floor: the same LoRA fitted by regression to the exact noise prediction of the
tilted target and sampled with the same sampler from N(0, I). Prints one JSON object (stdout); each
setting's block is also printed to stderr as soon as it is done.

    python benchmarks/tilted_target.py                 # full run (CPU, tens of minutes on 2 shared cores)
    python benchmarks/tilted_target.py --drift_objectives value_guided   # one objective (+ fixed noise)
    python benchmarks/tilted_target.py --quick         # smaller, for a smoke test
    python benchmarks/tilted_target.py --conditional   # per-prompt targets (below)
    python benchmarks/tilted_target.py --flow          # rectified flow (below)
    python benchmarks/tilted_target.py --drift_objectives auto --seeds 0 1 2   # the default objective, 3 seeds

``--flow``: the same mixture as a rectified flow ``x_s = (1 - s) x_0 + s eps``; the pretrained model is the MLP
distilled to the exact velocity (``exact_velocity``, docs/algorithms.md §11), sampled by the flow SDE of a
``FlowMatchEulerDiscreteScheduler`` (``--shift``, default 1) at ``eta = 1`` (memoryless) and ``--low_eta``
(default 0.5 with ``--flow``: the GRPO-style level ``a = eta sqrt(2) ≈ 0.7``). The floor regresses the LoRA onto
the tilted target's exact velocity.

``--conditional``: three "prompts" (classes) over the same three modes, each with its own mode weights
(``class_conditional_mixtures``), a class-conditional MLP denoiser distilled to the exact conditional noise
prediction, the same linear reward. For every prompt the tilted target is known in closed form. At DDIM
``--low_eta`` (default 0.2; stages 1-2 with ``--value_rollouts`` and ``--noise_train_steps`` *per prompt*) it
reports, per prompt, the mode-weight TV of ELEGANT with a conditional start law
(``conditional_initial_noise=True``), with one prompt-agnostic learned start law, and with fixed N(0, I) noise,
and the worst prompt of each; plus the time and peak memory of stages 1-2 with and without the condition on the
tiny Stable Diffusion pipeline (``--skip_sd_cost`` to skip). ``--held_out_prompt`` adds a fourth prompt that the
pretrained model knows but fine-tuning never draws, with the prompts' mode-weight vectors as condition features,
and reports its TV too (``worst_tv`` is over the training prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from hf_control_ft import ControlledSampler, ElegantConfig, ElegantTrainer
from hf_control_ft.core.control import add_lora_control, lora_parameters
from hf_control_ft.core.flow_matching import build_schedule, is_flow_scheduler
from hf_control_ft.processes import ClassConditionalProcess
from hf_control_ft.tasks.gaussian_mixture import (
    class_conditional_mixtures,
    distill_flow_velocity,
    distill_mixture_denoiser,
    exact_noise_prediction,
    exact_velocity,
    three_mode_mixture,
)


def evaluate(target, x):
    return {"tv": round(target.mode_weight_tv(x), 4),
            "mode_mean_errors": [round(e, 4) for e in target.mode_mean_errors(x)],
            "mode_weights": [round(float(w), 4) for w in
                             torch.bincount(target.assign(x), minlength=len(target.weights)).double() / len(x)]}


def load_denoiser(denoiser_state):
    from hf_control_ft.models.networks import MLPDenoiser

    model = MLPDenoiser(**denoiser_state["config"])
    model.load_state_dict(denoiser_state["weights"])
    return model.requires_grad_(False)


def discretisation_floor(denoiser_state, scheduler, target, args, eta):
    """TV reached by the same LoRA (rank 8) fitted by regression to the exact noise prediction of the tilted
    target, sampled from N(0, I) with the same sampler: what the sampler's discretisation and the adapter's
    capacity allow, independent of the drift optimiser (docs/algorithms.md §8)."""
    model = load_denoiser(denoiser_state)
    torch.manual_seed(args.seed)
    add_lora_control(model, rank=8)
    schedule = build_schedule(scheduler, args.steps, eta)
    flow = is_flow_scheduler(scheduler)
    abar = None if flow else schedule.alpha_bar.float()
    params = lora_parameters(model)
    opt = torch.optim.Adam(params, lr=args.floor_lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.floor_steps)
    gen = torch.Generator().manual_seed(args.seed + 7)
    t0 = time.perf_counter()
    for _ in range(args.floor_steps):
        k = torch.randint(0, len(schedule), (1024,), generator=gen)
        x0 = target.sample(1024, gen)
        noise = torch.randn(x0.shape, generator=gen)
        if flow:  # regress onto the tilted target's exact velocity at the sampler's levels
            s_k = schedule.levels[k].float()
            xt = (1 - s_k)[:, None] * x0 + s_k[:, None] * noise
            exact = exact_velocity(target, xt, s_k)
        else:
            a = abar[k]
            xt = a.sqrt()[:, None] * x0 + (1 - a).sqrt()[:, None] * noise
            exact = exact_noise_prediction(target, xt, a)
        loss = (model(xt, schedule.timesteps[k]).sample - exact).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
    sampler = ControlledSampler(model, schedule)
    gen = torch.Generator().manual_seed(99)
    batches = max(1, args.eval_samples // 2048)
    x = torch.cat([sampler.sample(torch.randn(2048, 2, generator=gen), gen) for _ in range(batches)])
    return {**evaluate(target, x), "fit_loss": round(loss.item(), 5),
            "fit_seconds": round(time.perf_counter() - t0, 1)}


def run_seeds(denoiser_state, scheduler, target, reward, args, eta, learn_initial_noise, drift_objective):
    """:func:`run_setting` for every training seed of ``--seeds`` (one run when not given); with several seeds
    the block holds each seed's run and the mean and standard deviation of the mode-weight TV."""
    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        args.train_seed = seed
        runs.append(run_setting(denoiser_state, scheduler, target, reward, args, eta, learn_initial_noise,
                                drift_objective))
    if len(runs) == 1:
        return runs[0]
    tvs = torch.tensor([r["samples"]["tv"] for r in runs], dtype=torch.float64)
    out = {"seeds": seeds, "tv_mean": round(float(tvs.mean()), 4), "tv_std": round(float(tvs.std()), 4),
           "runs": runs}
    if "pretrained" in runs[0]:
        out["pretrained"] = runs[0]["pretrained"]
    return out


def run_setting(denoiser_state, scheduler, target, reward, args, eta, learn_initial_noise, drift_objective):
    model = load_denoiser(denoiser_state)
    cfg = ElegantConfig(alpha=args.alpha, eta=eta, num_inference_steps=args.steps,
                        learn_initial_noise=learn_initial_noise, train_steps=args.train_steps,
                        batch_size=args.batch_size, learning_rate=args.lr, lora_rank=8,
                        seed=getattr(args, "train_seed", args.seed),
                        value_num_rollouts=args.value_rollouts, value_train_steps=args.value_train_steps,
                        noise_train_steps=args.noise_train_steps, report_to=None, max_grad_norm=args.max_grad_norm,
                        lr_scheduler=args.lr_scheduler, drift_objective=drift_objective)
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
    targets = [m.tilted_linear(c, args.alpha) for m in mixtures]

    def linear_reward(x):
        return x @ c.to(x)

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    t0 = time.perf_counter()
    den = distill_mixture_denoiser(mixtures, scheduler, steps=args.distill_steps, seed=args.seed)
    state = {"config": {k: v for k, v in dict(den.config).items() if not k.startswith("_")},
             "weights": den.state_dict()}
    result = {"benchmark": "tilted_target --conditional", "alpha": args.alpha, "eta": args.low_eta,
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
        cfg = ElegantConfig(alpha=args.alpha, eta=args.low_eta, num_inference_steps=args.steps,
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--low_eta", type=float, default=None, help="default 0.2 (DDIM), 0.5 (--flow)")
    p.add_argument("--flow", action="store_true", help="rectified flow + FlowMatchEulerDiscreteScheduler")
    p.add_argument("--shift", type=float, default=1.0, help="--flow: the scheduler's shift")
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
    p.add_argument("--drift_objectives", type=str, default="value_guided,pathwise",
                   help="comma-separated ElegantConfig.drift_objective values; the first also runs with fixed noise")
    p.add_argument("--skip_fixed_noise", action="store_true", help="run only ELEGANT with learned noise")
    p.add_argument("--floor_steps", type=int, default=1500, help="regression steps of the discretisation floor")
    p.add_argument("--floor_lr", type=float, default=3e-3)
    p.add_argument("--skip_floor", action="store_true", help="skip the discretisation-floor fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds (the pretrained model stays that of --seed); reports the TV's mean and std")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    p.add_argument("--conditional", action="store_true", help="per-prompt targets of a class-conditional mixture")
    p.add_argument("--skip_sd_cost", action="store_true", help="--conditional without the tiny-SD stage cost")
    p.add_argument("--variants", default="conditional,prompt_agnostic,fixed_noise",
                   help="--conditional: comma-separated start laws to run")
    p.add_argument("--held_out_prompt", action="store_true",
                   help="--conditional: add a prompt never drawn in fine-tuning (generalisation of the start law)")
    args = p.parse_args()
    if args.low_eta is None:
        args.low_eta = 0.5 if args.flow else 0.2
    if args.quick:
        args.train_steps, args.distill_steps, args.value_rollouts = 30, 300, 1024
        args.value_train_steps, args.noise_train_steps, args.eval_samples, args.steps = 100, 50, 2048, 20
        args.floor_steps = 200
    if args.conditional:
        print(json.dumps(run_conditional(args)))
        return

    mixture = three_mode_mixture()
    c = torch.tensor([0.5, 0.3])
    target = mixture.tilted_linear(c, args.alpha)

    def linear_reward(x):
        return x @ c.to(x)

    t0 = time.perf_counter()
    if args.flow:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift)
        den = distill_flow_velocity(mixture, steps=args.distill_steps, seed=args.seed)
    else:
        scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
        den = distill_mixture_denoiser(mixture, scheduler, steps=args.distill_steps, seed=args.seed)
    state = {"config": dict(den.config), "weights": den.state_dict()}
    state["config"] = {k: v for k, v in state["config"].items() if not k.startswith("_")}
    result = {"benchmark": "tilted_target" + (" --flow" if args.flow else ""), "alpha": args.alpha,
              "num_inference_steps": args.steps, "scheduler": type(scheduler).__name__,
              "reward": "linear c=(0.5, 0.3)", "pretrained_weights": mixture.weights.tolist(),
              "target_weights": [round(float(w), 4) for w in target.weights],
              "target_means": [[round(float(v), 4) for v in m] for m in target.means],
              "distill_seconds": round(time.perf_counter() - t0, 1), "settings": {}}
    etas = [float(e) for e in args.etas.split(",")] if args.etas else [1.0, args.low_eta]
    objectives = args.drift_objectives.split(",")
    result["drift_objectives"] = objectives
    for eta in etas:
        out = result["settings"][f"eta={eta}"] = {}
        for i, obj in enumerate(objectives):
            res = run_seeds(state, scheduler, target, linear_reward, args, eta, True, obj)
            if i == 0:
                out["pretrained"] = res["pretrained"]
            res.pop("pretrained")
            out[f"elegant_{obj}"] = res
        if not args.skip_fixed_noise:
            fixed = run_seeds(state, scheduler, target, linear_reward, args, eta, False, objectives[0])
            out[f"elegant_fixed_noise_{objectives[0]}"] = fixed
        if not args.skip_floor:
            out["discretisation_floor"] = discretisation_floor(state, scheduler, target, args, eta)
        print(json.dumps({f"eta={eta}": out}), file=sys.stderr, flush=True)  # progress; final JSON on stdout
    print(json.dumps(result))


if __name__ == "__main__":
    main()
