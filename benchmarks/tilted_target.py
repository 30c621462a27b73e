"""Exact-target benchmark (docs/algorithms.md §5): does ELEGANT sample p_pre(x) exp(r(x)/alpha) / Z?

Cases (``benchmarks/tilted_cases.py``): ``linear_2d`` (a 2-D three-mode Gaussian mixture, linear reward, alpha 2,
DDIM at eta 1.0 / 0.2), ``bounded_3d`` (a 3-D four-mode anisotropic mixture, a bounded nonlinear bump reward,
alpha 1, DDIM at eta 1.0 / 0.3) and ``flow_linear_2d`` (``linear_2d`` as a rectified flow, exact flow
transitions at eta 1.0 / 0.5). The pretrained model is a small MLP distilled to the exact noise prediction (velocity); every tilted
target is known exactly (closed form, or exact rejection sampling for the bounded reward). For each eta it
reports the total-variation distance between the samples' mode weights and the target's, and each mode's mean
error, for the pretrained model, ELEGANT with each drift objective of ``--drift_objectives``
(``ElegantConfig.drift_objective``), ELEGANT with learn_initial_noise=False (first objective), and a
discretisation floor: the same LoRA fitted by regression to the tilted target's noise prediction and sampled
with the same sampler from N(0, I). With several ``--seeds`` each block holds every seed's run and the mean,
standard deviation and 95% t-interval of the TV. Prints one JSON object (stdout); each block is also printed to
stderr as soon as it is done.

    python benchmarks/tilted_target.py --suite --workers 2   # every case, the default objective, 3 seeds
    python benchmarks/tilted_target.py                 # linear_2d: value_guided, pathwise, fixed noise, floor
    python benchmarks/tilted_target.py --case bounded_3d --drift_objectives auto --seeds 0 1 2
    python benchmarks/tilted_target.py --exact_values --etas 1.0 --seeds 0 1 2   # + ELEGANT on exact values
    python benchmarks/tilted_target.py --quick         # smaller, for a smoke test
    python benchmarks/tilted_target.py --conditional   # per-prompt targets (below)
    python benchmarks/tilted_target.py --flow          # = --case flow_linear_2d

``--suite``: the three cases above (``--held_out``: instead the held-out ``bump_2d`` and ``flow_bump_3d`` of
``tilted_cases.py``, never used to choose a setting) at their two etas with the default objective (``auto``),
seeds 0 1 2 (or ``--seeds``), the floor, no fixed-noise runs (``--with_fixed_noise`` adds them) and a summary
table (the last stdout line is the JSON). About 2.5 CPU-minutes a run; ``--workers 2`` runs two at a time.

``--exact_values`` (linear DDIM case, eta = 1): adds ELEGANT (``value_guided``) whose stage-2 value and per-step values
are the exact soft values of the continuous-time pretrained process (``ExactLinearValues``) instead of fitted
ones: the difference to the default run is the error of the value fits.

``flow_linear_2d`` (``--flow``): the same mixture as a rectified flow ``x_s = (1 - s) x_0 + s eps``; the
pretrained model is the MLP distilled to the exact velocity (``exact_velocity``, docs/algorithms.md §11), sampled
by the exact flow transitions of a ``FlowMatchEulerDiscreteScheduler`` (``--shift``, default 1) at ``eta = 1`` (memoryless)
and 0.5 (near the GRPO-style level ``a = eta sqrt(2) ≈ 0.7``). The floor regresses the LoRA onto
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
import multiprocessing
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_stats import interval  # noqa: E402
from tilted_cases import (  # noqa: E402
    CASES,
    HELD_OUT,
    ExactLinearValues,
    build_case,
    describe_case,
    discretisation_floor,
    evaluate,
    load_denoiser,
)

from hf_control_ft import ElegantConfig, ElegantTrainer  # noqa: E402

_CASES: dict = {}  # name -> built case, shared with forked workers
_ARGS = None


def run_setting(case: dict, args, eta: float, kind: str, objective: str, seed: int, lora_init: dict | None = None,
                after_train=None) -> dict:
    """One ELEGANT run. ``kind``: ``"learned"`` (learned initial noise), ``"fixed"`` (``N(0, I)`` start) or
    ``"exact"`` (learned initial noise and value-guided drift on the exact soft values, ``ExactLinearValues``).
    ``lora_init``: adapter parameters (name -> tensor) the drift starts from instead of zero control;
    ``after_train(trainer)``: extra measurements of the trained model, merged into the result."""
    model = load_denoiser(case["denoiser_state"])
    cfg = ElegantConfig(alpha=case["alpha"], eta=eta, num_inference_steps=args.steps,
                        learn_initial_noise=kind != "fixed", train_steps=args.train_steps,
                        batch_size=args.batch_size, learning_rate=args.lr, lora_rank=8, seed=seed,
                        value_num_rollouts=args.value_rollouts, value_train_steps=args.value_train_steps,
                        step_value_train_steps=args.step_value_train_steps,
                        noise_train_steps=args.noise_train_steps, report_to=None, max_grad_norm=args.max_grad_norm,
                        lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
                        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                        regression_weight_power=args.regression_weight_power,
                        drift_objective="value_guided" if kind == "exact" else objective)
    dim = case["mixture"].dim
    trainer = ElegantTrainer(cfg, model, case["scheduler"], case["reward"], (dim,))
    out = {"seed": seed, "drift_objective": trainer.config.drift_objective}
    if kind != "fixed":  # the pretrained model, same sampler
        x = trainer.sample(args.eval_samples, torch.Generator().manual_seed(1234), 2048, controlled=False)
        out["pretrained"] = evaluate(case["target"], x)
    if lora_init is not None:
        params = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for name, value in lora_init.items():
                params[name].copy_(value)
    t0 = time.perf_counter()
    if kind == "exact":
        exact = ExactLinearValues(case["mixture"], case["linear_c"], case["alpha"], trainer.schedule)
        trainer.value_function = exact
        trainer.train_initial_noise()
        trainer.initial_noise_trained = True
        trainer.step_values = exact
    summary = trainer.train()
    out["train_seconds"] = round(time.perf_counter() - t0, 1)
    out["final_reward"] = round(summary["train/reward"], 4)
    out["final_kl"] = round(summary["train/kl"] + summary["train/kl_init"], 4)
    out["samples"] = evaluate(case["target"], trainer.sample(args.eval_samples, torch.Generator().manual_seed(99),
                                                             2048))
    if after_train is not None:
        out.update(after_train(trainer))
    return out


def _job(job: tuple):
    """Runs one job of :func:`jobs` in this process (a forked worker or the parent)."""
    torch.set_num_threads(1)
    case_name, eta, kind, objective, seed = job
    case = _CASES[case_name]
    t0 = time.perf_counter()
    if kind == "floor":
        res = discretisation_floor(case, eta, _ARGS.steps, _ARGS.floor_steps, _ARGS.floor_lr, _ARGS.eval_samples,
                                   _ARGS.seed)
    else:
        res = run_setting(case, _ARGS, eta, kind, objective, seed)
    tv = res["samples"]["tv"] if "samples" in res else res["tv"]
    print(f"done {case_name} eta={eta} {kind} {objective} seed {seed}: tv {tv} ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr, flush=True)
    return job, res


def jobs(args, case_name: str) -> list[tuple]:
    """``(case, eta, kind, objective, seed)`` of every run the arguments ask for in one case."""
    out = []
    etas = [float(e) for e in args.etas.split(",")] if args.etas else list(CASES[case_name]["etas"])
    if args.low_eta is not None and not args.etas:
        etas = [etas[0], args.low_eta]
    seeds = args.seeds or [args.seed]
    objectives = args.drift_objectives.split(",")
    for eta in etas:
        for obj in objectives:
            out += [(case_name, eta, "learned", obj, s) for s in seeds]
        if not args.skip_fixed_noise:
            out += [(case_name, eta, "fixed", objectives[0], s) for s in seeds]
        # exact only at eta = 1: there the chain's law of x_0 given x_k is the forward posterior; below it the
        # sampler's conditional law (and so its value) differs (docs/algorithms.md §3)
        if args.exact_values and eta == 1.0 and _CASES[case_name]["linear_c"] is not None \
                and not _CASES[case_name]["flow"]:
            out += [(case_name, eta, "exact", "value_guided", s) for s in seeds]
        if not args.skip_floor:
            out.append((case_name, eta, "floor", "", args.seed))
    return out


def _block(runs: list[dict]) -> dict:
    """One seed's run as it is, several seeds with the TV's mean, std and 95% t-interval."""
    if len(runs) == 1:
        return runs[0]
    tvs = [r["samples"]["tv"] for r in runs]
    ci = interval(tvs)
    std = (sum((t - ci["mean"]) ** 2 for t in tvs) / (len(tvs) - 1)) ** 0.5
    return {"seeds": [r["seed"] for r in runs], "tv_mean": round(ci["mean"], 4), "tv_std": round(std, 4),
            "tv_ci95": [round(ci["ci95_low"], 4), round(ci["ci95_high"], 4)], "runs": runs}


def assemble(case_name: str, results: dict) -> dict:
    """The JSON block of a case from the results of its jobs (``{job: result}``)."""
    out = {**describe_case(_CASES[case_name]), "settings": {}}
    for (name, eta, kind, obj, _), res in results.items():
        if name != case_name:
            continue
        setting = out["settings"].setdefault(f"eta={eta}", {})
        if kind == "floor":
            setting["discretisation_floor"] = res
            continue
        key = {"learned": f"elegant_{obj}", "fixed": f"elegant_fixed_noise_{obj}", "exact": "elegant_exact_values"}
        setting.setdefault(key[kind], []).append(res)
        if "pretrained" in res and "pretrained" not in setting:
            setting["pretrained"] = res["pretrained"]
    for setting in out["settings"].values():
        for key, runs in list(setting.items()):
            if isinstance(runs, list):
                for r in runs:
                    r.pop("pretrained", None)
                setting[key] = _block(sorted(runs, key=lambda r: r["seed"]))
    return out


def summary_rows(cases: dict) -> list[dict]:
    """One row per (case, eta, method): TV mean and interval (or the single value)."""
    rows = []
    for name, block in cases.items():
        for eta, setting in block["settings"].items():
            for method, res in setting.items():
                tv = res.get("tv_mean", res.get("samples", res).get("tv"))
                rows.append({"case": name, "setting": eta, "method": method, "tv": tv,
                             "tv_ci95": res.get("tv_ci95"), "seeds": len(res.get("seeds", [0]))})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | setting | method | TV (mean) | 95% interval | seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        ci = "" if not r["tv_ci95"] else f"[{r['tv_ci95'][0]:.3f}, {r['tv_ci95'][1]:.3f}]"
        lines.append(f"| {r['case']} | {r['setting']} | {r['method']} | {r['tv']:.3f} | {ci} | {r['seeds']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=sorted(CASES), default="linear_2d")
    p.add_argument("--suite", action="store_true", help="every case with the default objective, 3 seeds, floors")
    p.add_argument("--held_out", action="store_true",
                   help="--suite on the held-out cases (tilted_cases.HELD_OUT) instead of the three tuning cases")
    p.add_argument("--alpha", type=float, default=None, help="default: the case's (2 linear, 1 bounded)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--low_eta", type=float, default=None, help="replaces the case's low eta")
    p.add_argument("--flow", action="store_true", help="= --case flow_linear_2d")
    p.add_argument("--shift", type=float, default=1.0, help="flow case: the scheduler's shift")
    p.add_argument("--train_steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max_grad_norm", type=float, default=None)
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--regression_weight_power", type=float, default=0.0,
                   help="ElegantConfig.regression_weight_power (0, the default: KL-unit step weights)")
    p.add_argument("--value_rollouts", type=int, default=4096)
    p.add_argument("--value_train_steps", type=int, default=500)
    p.add_argument("--step_value_train_steps", type=int, default=2000)
    p.add_argument("--noise_train_steps", type=int, default=200)
    p.add_argument("--distill_steps", type=int, default=1500)
    p.add_argument("--eval_samples", type=int, default=8192)
    p.add_argument("--etas", type=str, default=None, help="comma-separated etas (default: the case's two)")
    p.add_argument("--drift_objectives", type=str, default=None,
                   help="comma-separated ElegantConfig.drift_objective values; the first also runs with fixed noise "
                        "(default: value_guided,pathwise; auto with --suite)")
    p.add_argument("--skip_fixed_noise", action="store_true", help="run only ELEGANT with learned noise")
    p.add_argument("--with_fixed_noise", action="store_true", help="--suite: add the fixed-noise runs")
    p.add_argument("--exact_values", action="store_true", help="linear DDIM case: add ELEGANT on exact values")
    p.add_argument("--floor_steps", type=int, default=1500, help="regression steps of the discretisation floor")
    p.add_argument("--floor_lr", type=float, default=3e-3)
    p.add_argument("--skip_floor", action="store_true", help="skip the discretisation-floor fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds (the pretrained model stays that of --seed); reports the TV's mean and std")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (forked, one CPU thread each)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    p.add_argument("--conditional", action="store_true", help="per-prompt targets of a class-conditional mixture")
    p.add_argument("--skip_sd_cost", action="store_true", help="--conditional without the tiny-SD stage cost")
    p.add_argument("--variants", default="conditional,prompt_agnostic,fixed_noise",
                   help="--conditional: comma-separated start laws to run")
    p.add_argument("--held_out_prompt", action="store_true",
                   help="--conditional: add a prompt never drawn in fine-tuning (generalisation of the start law)")
    args = p.parse_args(argv)
    if args.flow:
        args.case = "flow_linear_2d"
    if args.drift_objectives is None:
        args.drift_objectives = "auto" if args.suite else "value_guided,pathwise"
    if args.suite:
        args.seeds = args.seeds or [0, 1, 2]
        args.skip_fixed_noise = not args.with_fixed_noise
    if args.quick:  # smaller sizes, except where a flag was given
        quick = dict(train_steps=30, distill_steps=300, value_rollouts=1024, value_train_steps=100,
                     noise_train_steps=50, eval_samples=2048, steps=20, floor_steps=200, step_value_train_steps=300)
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    return args


def main(argv=None):
    global _ARGS
    args = _ARGS = parse_args(argv)
    if args.conditional:
        from tilted_conditional import run_conditional

        args.low_eta = 0.2 if args.low_eta is None else args.low_eta
        print(json.dumps(run_conditional(args)))
        return
    names = [c for c in sorted(CASES) if (c in HELD_OUT) == args.held_out] if args.suite else [args.case]
    for name in names:
        _CASES[name] = build_case(name, args.alpha, args.distill_steps, args.seed, args.shift,
                                  num_reference=200_000 if args.quick else 1_000_000)
    todo = [j for name in names for j in jobs(args, name)]
    t0 = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            results = dict(pool.imap_unordered(_job, todo))
    else:
        results = dict(_job(j) for j in todo)
    cases = {name: assemble(name, results) for name in names}
    meta = {"num_inference_steps": args.steps, "train_steps": args.train_steps, "batch_size": args.batch_size,
            "learning_rate": args.lr, "lr_scheduler": args.lr_scheduler, "lr_warmup_steps": args.lr_warmup_steps,
            "adam_betas": [args.adam_beta1, args.adam_beta2],
            "regression_weight_power": args.regression_weight_power,
            "drift_objectives": args.drift_objectives.split(","),
            "wall_seconds": round(time.perf_counter() - t0, 1)}
    if not args.suite:
        print(json.dumps({"benchmark": f"tilted_target --case {args.case}", **meta, **cases[args.case]}))
        return
    rows = summary_rows(cases)
    print(markdown(rows), file=sys.stderr)
    print(json.dumps({"benchmark": "tilted_target --suite", **meta, "cases": cases, "summary": rows}))


if __name__ == "__main__":
    main()
