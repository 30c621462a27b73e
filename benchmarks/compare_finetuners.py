"""ELEGANT side by side with GRPO-style, DDPO and reward-backprop fine-tuning at equal network evaluations (NFE).

Task: the exact mixture of ``benchmarks/tilted_cases.py`` (``linear_2d``: 2-D three-mode mixture, linear reward,
alpha 2; its tilted law ``p_pre exp(r / alpha) / Z`` is known), on the same distilled denoiser, LoRA (rank 8),
sampler and reward for every method (baselines: ``benchmarks/finetuner_baselines.py``):

* ``--sampler ddim``: DDIM at eta = 1 (DDPO's and GRPO's DDPM-style noise), 50 steps;
* ``--sampler flow``: the same mixture as a rectified flow, flow SDE at Flow-GRPO's noise level ``a = 0.7``
  (``eta = a / sqrt(2)``), 50 steps.

ELEGANT runs with the library's defaults (``drift_objective="auto"``: value-guided here, learned initial noise) for
``--train_steps`` iterations; its total NFE (stages 1-2 included) is the budget every other method gets. Every
``--eval_points``-th of the budget ELEGANT is evaluated (the baselines at log-spaced points from 1/300 of the budget
to all of it) on ``--eval_samples`` fresh samples (not counted as NFE):
mean reward, the exact path KL to the pretrained model (per-step Gaussian KLs + the start law's KL) and the
mode-weight TV to the tilted target. NFE counts forward and backward sample-evaluations of the denoiser (a
backward counted as one evaluation; ``NFECounter``).

    OMP_NUM_THREADS=1 python benchmarks/compare_finetuners.py --sampler ddim --seeds 0 1 2 --workers 2 \
        --png finetuners_ddim.png > finetuners_ddim.json

Prints one JSON object (a record per method and seed with its curve, and a summary per method); the summary
table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_stats import interval  # noqa: E402
from finetuner_baselines import NFECounter, policy_gradient_epoch, reward_backprop_iteration  # noqa: E402
from tilted_cases import build_case, load_denoiser  # noqa: E402

from hf_control_ft import ControlledSampler, ElegantConfig, ElegantTrainer  # noqa: E402
from hf_control_ft.core.control import add_lora_control, lora_parameters  # noqa: E402
from hf_control_ft.core.flow_matching import build_schedule, memoryless_eta  # noqa: E402

METHODS = ("elegant", "grpo", "ddpo", "reward_backprop")
QUICK_STAGES = {"value_num_rollouts": 256, "value_train_steps": 30, "step_value_train_steps": 30,
                "noise_train_steps": 10}
_CASE: dict = {}
_ARGS = None


def evaluate(draw, sampler, n: int, seed: int) -> dict:
    """Reward, exact path KL (+ start-law KL) and mode-weight TV of ``n`` fresh samples; ``draw(n, gen)`` gives
    ``(x_T, kl_init)``."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    x_T, kl_init = draw(n, gen)
    traj = sampler.rollout(x_T, gen, measure_kl=True)
    target = _CASE["target"]
    reward, kl = float(_CASE["reward"](traj.samples).mean()), float(traj.kl.mean() + kl_init.mean())
    finite = math.isfinite(reward) and math.isfinite(kl)  # a diverged run (NaN / inf samples) is recorded as such
    return {"reward": round(reward, 4) if finite else None, "kl": round(kl, 4) if finite else None,
            "tv": round(target.mode_weight_tv(traj.samples), 4), "diverged": not finite}


def _standard_start(dim):
    return lambda n, gen: (torch.randn(n, dim, generator=gen), torch.zeros(n))


def run_elegant(args, seed: int) -> dict:
    case = _CASE
    model = load_denoiser(case["denoiser_state"])
    counter = NFECounter(model)
    cfg = ElegantConfig(alpha=case["alpha"], eta=args.eta, num_inference_steps=args.steps, train_steps=args.train_steps,
                        batch_size=args.batch_size, learning_rate=args.lr, lora_rank=8, seed=seed, report_to=None,
                        **(QUICK_STAGES if args.quick else {}))
    trainer = ElegantTrainer(cfg, model, case["scheduler"], case["reward"], (case["mixture"].dim,))
    curve, t0 = [], time.perf_counter()
    every = max(1, args.train_steps // args.eval_points)

    def callback(tr, step):
        if step % every == 0 or step == args.train_steps:
            with torch.no_grad(), counter.pause():
                point = evaluate(lambda n, gen: tr.draw_initial_noise(n, gen), tr.sampler, args.eval_samples, seed)
            curve.append({"nfe": counter.total, "wall_s": round(time.perf_counter() - t0, 1), **point})

    summary = trainer.train(callback=callback)
    return {"curve": curve, "drift_objective": summary["drift_objective"],
            "nfe_forward": counter.forward, "nfe_backward": counter.backward}


def run_baseline(args, method: str, seed: int, budget: int) -> dict:
    case = _CASE
    torch.manual_seed(seed)
    model = load_denoiser(case["denoiser_state"])
    add_lora_control(model, rank=8)
    counter = NFECounter(model)
    sampler = ControlledSampler(model, build_schedule(case["scheduler"], args.steps, args.eta),
                                gradient_checkpointing=False)
    opt = torch.optim.Adam(lora_parameters(model), lr=args.baseline_lr or args.lr)
    gen = torch.Generator().manual_seed(seed)
    dim = case["mixture"].dim
    # evaluations log-spaced over the budget (1/300 of it to all of it): the early, low-KL part of a curve is
    # where it can be compared with ELEGANT at matched KL
    marks = [int(budget * 300 ** (i / (args.eval_points - 1) - 1)) for i in range(args.eval_points)]
    curve, t0 = [], time.perf_counter()
    while counter.total < budget:
        if method == "reward_backprop":
            reward_backprop_iteration(sampler, opt, case["reward"], dim, args.batch_size, gen, args.truncate)
        else:
            policy_gradient_epoch(sampler, opt, case["reward"], dim, args.batch_size, gen, method)
        if marks and counter.total >= marks[0]:
            while marks and counter.total >= marks[0]:
                marks.pop(0)
            with torch.no_grad(), counter.pause():
                point = evaluate(_standard_start(dim), sampler, args.eval_samples, seed)
            curve.append({"nfe": counter.total, "wall_s": round(time.perf_counter() - t0, 1), **point})
    return {"curve": curve, "nfe_forward": counter.forward, "nfe_backward": counter.backward}


def _job(job):
    torch.set_num_threads(1)
    method, seed, budget = job
    t0 = time.perf_counter()
    res = run_elegant(_ARGS, seed) if method == "elegant" else run_baseline(_ARGS, method, seed, budget)
    res.update({"method": method, "seed": seed, "final": res["curve"][-1], "seconds": round(time.perf_counter() - t0)})
    print(f"done {method} seed {seed}: {res['final']} ({res['seconds']} s)", file=sys.stderr, flush=True)
    return res


def first_reaching(curve: list, reward: float):
    """The first evaluation point (``nfe``, ``wall_s``, ``reward``, ``kl``, ``tv``) with mean reward >= ``reward``
    (``None`` if never)."""
    for p in curve:
        if p["reward"] is not None and p["reward"] >= reward:
            return p
    return None


def summarise(records: list) -> dict:
    out = {}
    for m in METHODS:
        recs = [r for r in records if r["method"] == m]
        if not recs:
            continue
        ok = [r for r in recs if not r["final"]["diverged"]]
        out[m] = {key: interval([r["final"][key] for r in ok]) if ok else None for key in ("reward", "kl")}
        out[m].update({key: interval([r["final"][key] for r in recs]) for key in ("tv", "nfe", "wall_s")})
        out[m]["diverged_runs"] = len(recs) - len(ok)
        out[m]["best_reward_before_divergence"] = interval(
            [max(p["reward"] for p in r["curve"] if p["reward"] is not None) for r in recs
             if any(p["reward"] is not None for p in r["curve"])])
    if out.get("elegant", {}).get("kl"):
        kl_e = out["elegant"]["kl"]["mean"]
        for m in METHODS[1:]:
            at = [max((p for p in r["curve"] if p["kl"] is not None and p["kl"] <= kl_e), key=lambda p: p["kl"],
                      default=None) for r in records if r["method"] == m]
            if m in out:
                out[m]["at_elegant_kl"] = {
                    "kl_limit": kl_e, "runs_with_a_point": sum(a is not None for a in at),
                    "reward": interval([a["reward"] for a in at if a]) if any(at) else None,
                    "tv": interval([a["tv"] for a in at if a]) if any(at) else None,
                    "nfe": interval([a["nfe"] for a in at if a]) if any(at) else None}
    if out.get("grpo", {}).get("reward") and "elegant" in out:
        goal = out["grpo"]["reward"]["mean"]
        hits = [first_reaching(r["curve"], goal) for r in records if r["method"] == "elegant"]
        grpo_nfe, grpo_kl = out["grpo"]["nfe"]["mean"], out["grpo"]["kl"]["mean"]
        out["elegant_vs_grpo"] = {
            "grpo_final_reward": goal, "elegant_runs_reaching_it": sum(h is not None for h in hits),
            "nfe_ratio": [None if h is None else round(h["nfe"] / grpo_nfe, 3) for h in hits],
            "kl_at_that_point": [None if h is None else h["kl"] for h in hits], "grpo_final_kl": grpo_kl,
            "goal_met": all(h is not None and h["nfe"] <= grpo_nfe / 5 and h["kl"] <= grpo_kl for h in hits)}
    return out


def plot(records: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = dict(zip(METHODS, ("C0", "C1", "C2", "C3")))
    for r in records:
        c, label = colours[r["method"]], r["method"] if r["seed"] == min(x["seed"] for x in records) else None
        nfe = [p["nfe"] / 1e6 for p in r["curve"]]
        ok = [(n, p) for n, p in zip(nfe, r["curve"]) if p["reward"] is not None]
        axes[0].plot([n for n, _ in ok], [p["reward"] for _, p in ok], color=c, label=label, alpha=0.8)
        axes[1].plot([p["kl"] for _, p in ok], [p["reward"] for _, p in ok], "o-", ms=3, color=c, alpha=0.8)
        axes[2].plot(nfe, [p["tv"] for p in r["curve"]], color=c, alpha=0.8)
    # diverging runs reach rewards and KLs of 1e10 and more: log / symlog axes keep the rest readable
    axes[0].set(xlabel="network evaluations (millions)", ylabel="mean reward", xscale="log", yscale="symlog",
                title="reward vs NFE (diverged runs end their line)")
    axes[1].set(xlabel="path KL to the pretrained model (nats)", ylabel="mean reward", xscale="log",
                yscale="symlog", title="reward vs KL")
    axes[2].set(xlabel="network evaluations (millions)", ylabel="mode-weight TV to the tilted target",
                xscale="log", yscale="log", title="distance to p_pre exp(r/alpha)/Z")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    global _ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sampler", choices=["ddim", "flow"], default="ddim")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--train_steps", type=int, default=400, help="ELEGANT drift iterations (sets the NFE budget)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--baseline_lr", type=float, default=None, help="learning rate of the baselines (default --lr)")
    p.add_argument("--truncate", type=int, default=10, help="reward backprop: steps with gradients (last K)")
    p.add_argument("--eval_points", type=int, default=12)
    p.add_argument("--eval_samples", type=int, default=4096)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--png", default=None, help="write the curves here")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--replot", default=None, help="redraw --png from this JSON output instead of running")
    args = _ARGS = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            done = json.load(f)
        plot(done["records"], args.png, f"mixture, {done['sampler']} eta={done['eta']:.3f}, "
             f"{len({r['seed'] for r in done['records']})} seeds")
        return
    if args.quick:
        args.steps, args.train_steps, args.eval_points, args.eval_samples = 10, 6, 3, 512
    args.eta = 1.0 if args.sampler == "ddim" else memoryless_eta(0.7)
    _CASE.update(build_case("linear_2d" if args.sampler == "ddim" else "flow_linear_2d",
                            distill_steps=300 if args.quick else 1500))
    t0 = time.perf_counter()
    # ELEGANT first: its NFE is the budget of the others
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    run = pool.map if pool else lambda f, jobs: [f(j) for j in jobs]
    records = run(_job, [("elegant", s, 0) for s in args.seeds]) if "elegant" in args.methods else []
    budget = int(sum(r["final"]["nfe"] for r in records) / len(records)) if records else args.train_steps * 25_600
    records += run(_job, [(m, s, budget) for m in args.methods if m != "elegant" for s in args.seeds])
    if pool:
        pool.close()
    summary = summarise(records)
    for m, s in summary.items():
        if m in METHODS:
            reward = "diverged" if s["reward"] is None else f"{s['reward']['mean']:.3f}"
            kl = "diverged" if s["kl"] is None else f"{s['kl']['mean']:.3f}"
            print(f"{m:16s} reward {reward}  KL {kl}  TV {s['tv']['mean']:.3f}  NFE {s['nfe']['mean'] / 1e6:.2f}M  "
                  f"wall {s['wall_s']['mean']:.0f} s  diverged runs {s['diverged_runs']}", file=sys.stderr)
    if args.png:
        plot(records, args.png, f"mixture, {args.sampler} eta={args.eta:.3f}, {len(args.seeds)} seeds")
    print(json.dumps({"benchmark": "compare_finetuners", "sampler": args.sampler, "eta": args.eta,
                      "alpha": _CASE["alpha"], "steps": args.steps, "batch_size": args.batch_size,
                      "nfe_budget": budget, "target_weights": [round(float(w), 4) for w in _CASE["target"].weights],
                      "wall_seconds": round(time.perf_counter() - t0, 1), "summary": summary, "records": records}))


if __name__ == "__main__":
    main()
