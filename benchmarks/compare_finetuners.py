"""ELEGANT side by side with GRPO-style, DDPO and reward-backprop fine-tuning at equal network evaluations (NFE).

Every method gets the same pretrained model, LoRA targets and rank, sampler and training reward from the task
(``benchmarks/finetuner_tasks.py``; baselines: ``benchmarks/finetuner_baselines.py``):

* ``--task mixture`` (default): the exact mixture of ``benchmarks/tilted_cases.py`` (2-D, three modes, linear
  reward, alpha 2; its tilted law ``p_pre exp(r / alpha) / Z`` is known), LoRA rank 8, 50 steps, batch 128, lr 1e-3;
  ``--sampler ddim``: DDIM at eta = 1 (DDPO's and GRPO's DDPM-style noise); ``--sampler flow``: the mixture as a
  rectified flow, exact flow transitions at the eta of Flow-GRPO's noise level ``a = 0.7`` (``eta = a / sqrt(2)``). Scores: reward, path
  KL, mode-weight TV to the tilted target.
* ``--task digits``: the pretrained digits UNet, 15 DDPM steps at eta 1; every method trains on the *proxy*
  classifier's ``log p(3 | x)``, the *genuine* classifier (other half of the data) judges; ELEGANT with the shipped
  ``examples/configs/digits_elegant.yaml`` (alpha 1, learned initial noise, pathwise gradient). Scores: proxy and
  genuine reward, genuine 3-rate, diversity and within-class diversity (mean pairwise L2 among samples the genuine
  classifier calls a 3), path KL.

ELEGANT runs for ``--train_steps`` iterations; its total NFE (stages 1-2 included) is the budget every other method
gets (``--budget`` when ELEGANT is not run). ELEGANT is evaluated every ``--eval_points``-th of its iterations, the
baselines at log-spaced points from 1/300 of the budget to all of it, on ``--eval_samples`` fresh samples (not
counted as NFE): the task's scores and the exact path KL to the pretrained model (per-step Gaussian KLs + the start
law's KL). NFE counts forward and backward sample-evaluations of the denoiser (a backward counted as one;
``NFECounter``). ``--reach`` values: NFE, wall time and KL at which each method first reaches them (task's primary
score: reward on the mixture, genuine reward on digits). ``--baseline_lr grpo=.. ddpo=.. reward_backprop=..``
sets each baseline's learning rate.

    OMP_NUM_THREADS=1 python benchmarks/compare_finetuners.py --sampler ddim --seeds 0 1 2 --workers 2 \
        --png finetuners_ddim.png > finetuners_ddim.json

Prints one JSON object on stdout (a record per method and seed with its curve, and a summary per method); the
summary table goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from finetuner_tasks import build_task  # noqa: E402

from hf_control_ft import ControlledSampler, ElegantTrainer  # noqa: E402
from hf_control_ft.core.control import lora_parameters  # noqa: E402
from hf_control_ft.core.flow_matching import build_schedule  # noqa: E402

METHODS = ("elegant", "grpo", "ddpo", "reward_backprop")
_TASK = []  # the built task (shared with forked workers)
_ARGS = None


def evaluate(task, draw, sampler, n: int, seed: int) -> dict:
    """The task's scores of ``n`` fresh samples and their exact path KL (+ start-law KL); ``draw(n, gen)`` gives
    ``(x_T, kl_init)``."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    x_T, kl_init = draw(n, gen)
    traj = sampler.rollout(x_T, gen, measure_kl=True)
    return task.evaluate(traj.samples, float(traj.kl.mean() + kl_init.mean()))


def _standard_start(shape):
    return lambda n, gen: (torch.randn(n, *shape, generator=gen), torch.zeros(n))


def run_elegant(args, seed: int) -> dict:
    task = _TASK[0]
    model = task.new_model()
    counter = NFECounter(model)
    cfg = task.elegant_config(args, seed)
    trainer = ElegantTrainer(cfg, model, task.scheduler, task.reward, task.shape)
    curve, t0 = [], time.perf_counter()
    every = max(1, cfg.train_steps // args.eval_points)

    def callback(tr, step):
        if step % every == 0 or step == cfg.train_steps:
            with torch.no_grad(), counter.pause():
                point = evaluate(task, lambda n, gen: tr.draw_initial_noise(n, gen), tr.sampler, args.eval_samples,
                                 seed)
            curve.append({"nfe": counter.total, "wall_s": round(time.perf_counter() - t0, 1), **point})

    summary = trainer.train(callback=callback)
    return {"curve": curve, "drift_objective": summary["drift_objective"], "lr": cfg.learning_rate,
            "batch_size": cfg.batch_size, "nfe_forward": counter.forward, "nfe_backward": counter.backward}


def baseline_lr(args, method: str) -> float:
    """``--baseline_lr``: one float for every baseline or ``method=lr`` pairs; default the task's ELEGANT lr."""
    lrs = dict(item.split("=") if "=" in item else ("*", item) for item in (args.baseline_lr or []))
    return float(lrs.get(method, lrs.get("*", _TASK[0].lr)))


def run_baseline(args, method: str, seed: int, budget: int) -> dict:
    task = _TASK[0]
    torch.manual_seed(seed)
    model = task.new_model()
    task.add_lora(model)
    counter = NFECounter(model)
    sampler = ControlledSampler(model, build_schedule(task.scheduler, task.steps, task.eta),
                                gradient_checkpointing=False)
    lr, batch_size = baseline_lr(args, method), args.baseline_batch_size or task.batch_size
    opt = torch.optim.Adam(lora_parameters(model), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    # evaluations log-spaced over the budget (1/300 of it to all of it): the early, low-KL part of a curve is
    # where it can be compared with ELEGANT at matched KL
    marks = [int(budget * 300 ** (i / (args.eval_points - 1) - 1)) for i in range(args.eval_points)]
    curve, t0 = [], time.perf_counter()
    while counter.total < budget:
        if method == "reward_backprop":
            reward_backprop_iteration(sampler, opt, task.reward, task.shape, batch_size, gen, args.truncate)
        else:
            policy_gradient_epoch(sampler, opt, task.reward, task.shape, batch_size, gen, method)
        if marks and counter.total >= marks[0]:
            while marks and counter.total >= marks[0]:
                marks.pop(0)
            with torch.no_grad(), counter.pause():
                point = evaluate(task, _standard_start(task.shape), sampler, args.eval_samples, seed)
            curve.append({"nfe": counter.total, "wall_s": round(time.perf_counter() - t0, 1), **point})
    return {"curve": curve, "lr": lr, "batch_size": batch_size, "nfe_forward": counter.forward,
            "nfe_backward": counter.backward}


def _job(job):
    torch.set_num_threads(1)
    method, seed, budget = job
    t0 = time.perf_counter()
    res = run_elegant(_ARGS, seed) if method == "elegant" else run_baseline(_ARGS, method, seed, budget)
    res.update({"method": method, "seed": seed, "final": res["curve"][-1], "seconds": round(time.perf_counter() - t0)})
    print(f"done {method} seed {seed}: {res['final']} ({res['seconds']} s)", file=sys.stderr, flush=True)
    return res


def first_reaching(curve: list, value: float, key: str = "reward"):
    """The first evaluation point of ``curve`` whose ``key`` is >= ``value`` (``None`` if never)."""
    for p in curve:
        if p.get(key) is not None and p[key] >= value:
            return p
    return None


def _scores(task) -> tuple:
    return tuple(dict.fromkeys((task.primary, *task.metrics)))


def summarise(records: list, task, reach: list | None = None) -> dict:
    """Per method: intervals over seeds of every final score, NFE and wall time, diverged runs; each baseline at
    ELEGANT's final KL; NFE / wall time / KL at which each method first reaches the ``reach`` values of the
    task's primary reward; ELEGANT against GRPO's final primary reward (the issue's goal)."""
    out, primary = {}, task.primary
    for m in METHODS:
        recs = [r for r in records if r["method"] == m]
        if not recs:
            continue
        ok = [r for r in recs if not r["final"]["diverged"]]
        out[m] = {key: interval([r["final"][key] for r in ok if r["final"].get(key) is not None]) if ok else None
                  for key in _scores(task) if key != "tv"}
        if "tv" in task.metrics:  # a diverged run still has mode weights
            out[m]["tv"] = interval([r["final"]["tv"] for r in recs])
        out[m].update({key: interval([r["final"][key] for r in recs]) for key in ("nfe", "wall_s")})
        out[m]["diverged_runs"] = len(recs) - len(ok)
        out[m]["lr"], out[m]["batch_size"] = recs[0]["lr"], recs[0]["batch_size"]
        out[m][f"best_{primary}_before_divergence"] = interval(
            [max(p[primary] for p in r["curve"] if p[primary] is not None) for r in recs
             if any(p[primary] is not None for p in r["curve"])])
        for value in reach or []:
            hits = [first_reaching(r["curve"], value, primary) for r in recs]
            out[m][f"reach_{primary}_{value:g}"] = {
                "runs_reaching": sum(h is not None for h in hits),
                **{key: [None if h is None else h[key] for h in hits] for key in ("nfe", "wall_s", "kl")}}
    if out.get("elegant", {}).get("kl"):
        kl_e = out["elegant"]["kl"]["mean"]
        for m in METHODS[1:]:
            at = [max((p for p in r["curve"] if p["kl"] is not None and p["kl"] <= kl_e), key=lambda p: p["kl"],
                      default=None) for r in records if r["method"] == m]
            if m in out:
                out[m]["at_elegant_kl"] = {"kl_limit": kl_e, "runs_with_a_point": sum(a is not None for a in at)}
                out[m]["at_elegant_kl"].update({key: interval([a[key] for a in at if a and a.get(key) is not None])
                                                if any(at) else None for key in (*_scores(task), "nfe")})
    if (out.get("grpo") or {}).get(primary) and "elegant" in out:
        goal = out["grpo"][primary]["mean"]
        hits = [first_reaching(r["curve"], goal, primary) for r in records if r["method"] == "elegant"]
        grpo_nfe, grpo_kl = out["grpo"]["nfe"]["mean"], out["grpo"]["kl"]["mean"]
        out["elegant_vs_grpo"] = {
            "score": primary, "grpo_final": goal, "elegant_runs_reaching_it": sum(h is not None for h in hits),
            "nfe_ratio": [None if h is None else round(h["nfe"] / grpo_nfe, 3) for h in hits],
            "kl_at_that_point": [None if h is None else h["kl"] for h in hits], "grpo_final_kl": grpo_kl,
            "goal_met": all(h is not None and h["nfe"] <= grpo_nfe / 5 and h["kl"] <= grpo_kl for h in hits)}
    return out


PANEL_LABELS = {"reward": "mean reward", "genuine_reward": "genuine reward (held-out classifier, nats)",
                "tv": "mode-weight TV to the tilted target", "within_class_diversity": "within-class diversity (L2)",
                "diversity": "diversity: mean pairwise L2"}


def plot(records: list, path: str, title: str, primary: str, extra: tuple) -> None:
    """Panels: ``primary`` vs NFE, ``primary`` vs path KL, then each of ``extra`` vs NFE; a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(PANEL_LABELS, reward="proxy reward (trained on, nats)" if primary != "reward" else "mean reward")
    fig, axes = plt.subplots(1, 2 + len(extra), figsize=(5 * (2 + len(extra)), 4.2))
    colours = dict(zip(METHODS, ("C0", "C1", "C2", "C3")))
    for r in records:
        c, label = colours[r["method"]], r["method"] if r["seed"] == min(x["seed"] for x in records) else None
        ok = [p for p in r["curve"] if p[primary] is not None]
        axes[0].plot([p["nfe"] / 1e6 for p in ok], [p[primary] for p in ok], color=c, label=label, alpha=0.8)
        axes[1].plot([p["kl"] for p in ok], [p[primary] for p in ok], "o-", ms=3, color=c, alpha=0.8)
        for ax, key in zip(axes[2:], extra):
            pts = [p for p in r["curve"] if p.get(key) is not None]
            ax.plot([p["nfe"] / 1e6 for p in pts], [p[key] for p in pts], color=c, alpha=0.8)
    # diverging runs reach rewards and KLs of 1e10 and more: log / symlog axes keep the rest readable
    axes[0].set(xlabel="network evaluations (millions)", ylabel=labels[primary], xscale="log",
                yscale="symlog", title=f"{primary} vs NFE (diverged runs end their line)")
    axes[1].set(xlabel="path KL to the pretrained model (nats)", ylabel=labels[primary], xscale="log",
                yscale="symlog", title=f"{primary} vs KL")
    for ax, key in zip(axes[2:], extra):
        ax.set(xlabel="network evaluations (millions)", ylabel=labels[key], xscale="log",
               yscale="log" if key == "tv" else "linear", title=f"{key} vs NFE")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _title(info: dict, seeds: int) -> str:
    return f"{info['task']}, {info['sampler']} eta={info['eta']:.3f}, alpha {info['alpha']:g}, {seeds} seeds"


PLOT_EXTRA = {"mixture": ("tv",), "digits": ("reward", "within_class_diversity")}


def main(argv=None):
    global _ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["mixture", "digits"], default="mixture")
    p.add_argument("--sampler", choices=["ddim", "flow"], default="ddim", help="mixture only (digits: DDPM)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: mixture 50, digits its config)")
    p.add_argument("--train_steps", type=int, default=None,
                   help="ELEGANT drift iterations, which set the NFE budget (default: mixture 400, digits its config)")
    p.add_argument("--batch_size", type=int, default=None, help="ELEGANT's batch (default: mixture 128, digits config)")
    p.add_argument("--lr", type=float, default=None, help="ELEGANT's learning rate (default: mixture 1e-3, config)")
    p.add_argument("--baseline_batch_size", type=int, default=None, help="default: ELEGANT's batch")
    p.add_argument("--baseline_lr", nargs="+", default=None,
                   help="the baselines' learning rate: one value, or method=value pairs (default: ELEGANT's)")
    p.add_argument("--budget", type=int, default=None,
                   help="the baselines' NFE budget when ELEGANT is not among --methods (default: 25,600 per iteration)")
    p.add_argument("--truncate", type=int, default=10, help="reward backprop: steps with gradients (last K)")
    p.add_argument("--reach", type=float, nargs="*", default=None,
                   help="report the NFE / wall time at which each method first reaches these primary rewards")
    p.add_argument("--eval_points", type=int, default=12)
    p.add_argument("--eval_samples", type=int, default=4096)
    p.add_argument("--cache_dir", default=None, help="digits: the task's cache (pretrained model, classifiers)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--png", default=None, help="write the curves here")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--replot", default=None, help="redraw --png from this JSON output instead of running")
    args = _ARGS = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            done = json.load(f)
        info = done.get("task_info") or {"task": "mixture", **done}
        plot(done["records"], args.png, _title(info, len({r["seed"] for r in done["records"]})),
             done.get("primary", "reward"), PLOT_EXTRA[info["task"]])
        return
    if args.quick:
        args.train_steps, args.eval_points = args.train_steps or 6, 3
        args.eval_samples = 512 if args.eval_samples == p.get_default("eval_samples") else args.eval_samples
    with contextlib.redirect_stdout(sys.stderr):  # loading messages must not mix with the JSON on stdout
        task = build_task(args.task, args.sampler, quick=args.quick, cache_dir=args.cache_dir)
    task.steps = args.steps or task.steps
    task.batch_size, task.lr = args.batch_size or task.batch_size, args.lr or task.lr
    _TASK[:] = [task]
    t0 = time.perf_counter()
    # ELEGANT first: its NFE is the budget of the others
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    run = pool.map if pool else lambda f, jobs: [f(j) for j in jobs]
    records = run(_job, [("elegant", s, 0) for s in args.seeds]) if "elegant" in args.methods else []
    budget = (int(sum(r["final"]["nfe"] for r in records) / len(records)) if records
              else args.budget or (args.train_steps or 400) * 25_600)
    records += run(_job, [(m, s, budget) for m in args.methods if m != "elegant" for s in args.seeds])
    if pool:
        pool.close()
    summary = summarise(records, task, args.reach)
    for m, s in summary.items():
        if m in METHODS:
            scores = "  ".join(f"{k} " + ("diverged" if s.get(k) is None else f"{s[k]['mean']:.3f}")
                               for k in _scores(task))
            print(f"{m:16s} {scores}  NFE {s['nfe']['mean'] / 1e6:.2f}M  wall {s['wall_s']['mean']:.0f} s  "
                  f"diverged runs {s['diverged_runs']}", file=sys.stderr)
    info = task.describe()
    if args.png:
        plot(records, args.png, _title(info, len(args.seeds)), task.primary, PLOT_EXTRA[info["task"]])
    print(json.dumps({"benchmark": "compare_finetuners", "task_info": info, **info, "primary": task.primary,
                      "batch_size": task.batch_size, "nfe_budget": budget,
                      "wall_seconds": round(time.perf_counter() - t0, 1), "summary": summary, "records": records}))


if __name__ == "__main__":
    main()
