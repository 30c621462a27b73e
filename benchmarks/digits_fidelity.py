"""How close do fine-tuned digits models come to the exact tilted law ``p_pre(x) p_proxy(3 | x)^(1/alpha) / Z``?

The digits task of ``benchmarks/compare_finetuners.py`` (pretrained 8x8 DDPM, 15 steps at eta 1, reward = the
*proxy* classifier's ``log p(3 | x)``). For every ``--alphas`` value the exact tilted law is sampled by rejection
from the pretrained sampler (``hf_control_ft/tasks/digits_fidelity.py``): a reference set and an independent
floor set of ``--eval_samples`` each. Every evaluation point of every run (ELEGANT at each alpha; GRPO-style,
DDPO and reward backprop with the comparison's settings and ELEGANT-at-alpha-1's NFE budget) is scored against
every alpha's reference: Fréchet distance and kernel MMD^2 in the *genuine* classifier's penultimate features,
classifier two-sample-test accuracy (0.5 = indistinguishable) and the genuine class histogram's TV. Floors (the
floor set against the reference) and the pretrained model's distances come with them.

Every point also gets its exact path-space KL to the tilted path law, ``log Z - E[r] / alpha + KL`` (the
objective's gap to its optimum; ``Z`` = the acceptance rate). Summary per alpha: ELEGANT's final point; each
peer's final point and its point whose path KL is closest to
ELEGANT's final KL at that alpha ("matched KL"); means and 95% t-intervals over seeds.

    OMP_NUM_THREADS=1 python benchmarks/digits_fidelity.py --seeds 0 1 2 --workers 2 \\
        --png docs/figures/digits_fidelity.png > digits_fidelity.json

Prints one JSON object (stdout); a table goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
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

import compare_finetuners as cf  # noqa: E402
from bench_stats import interval  # noqa: E402
from finetuner_tasks import DigitsComparison  # noqa: E402

from hf_control_ft import ControlledSampler  # noqa: E402
from hf_control_ft.core.flow_matching import build_schedule  # noqa: E402
from hf_control_ft.tasks import digits_fidelity as fid  # noqa: E402

PEERS = ("grpo", "ddpo", "reward_backprop")
SCORES = ("frechet", "mmd2", "c2st", "class_tv")


class FidelityDigits(DigitsComparison):
    """The comparison's digits task whose evaluation adds the distances to each alpha's exact tilted samples."""

    def build_references(self, alphas, n: int, seed: int = 0) -> dict:
        """Per alpha: the reference and floor sets (exact, ``n`` each), the acceptance rate, the floor's and the
        pretrained sampler's distances to the reference."""
        sampler = ControlledSampler(self.unet, build_schedule(self.scheduler, self.steps, self.eta),
                                    gradient_checkpointing=False)

        def draw(b, gen):
            return sampler.sample(torch.randn(b, *self.shape, generator=gen), gen, controlled=False)

        gen = torch.Generator().manual_seed(seed)
        pretrained = fid.sample_summary(self.genuine, draw(n, gen))
        self.references, info = {}, {}
        for alpha in alphas:
            t0 = time.perf_counter()
            x, rate = fid.tilted_rejection_samples(draw, self.proxy, self.target_digit, alpha, 2 * n, gen)
            ref = self.references[alpha] = fid.sample_summary(self.genuine, x[:n])
            info[alpha] = {"acceptance_rate": round(rate, 4), "seconds": round(time.perf_counter() - t0, 1),
                           "floor": fid.fidelity_distances(fid.sample_summary(self.genuine, x[n:]), ref),
                           "pretrained": fid.fidelity_distances(pretrained, ref),
                           "reference_genuine_target_rate": round(float(ref["histogram"][self.target_digit]), 4)}
            print(f"alpha {alpha:g}: acceptance {rate:.4f}, floor {info[alpha]['floor']}, pretrained "
                  f"{info[alpha]['pretrained']}", file=sys.stderr, flush=True)
        return info

    def elegant_config(self, args, seed: int):
        """The comparison's ELEGANT config at this run's alpha, with ``--elegant`` overrides (validated)."""
        import dataclasses

        from hf_control_ft import ElegantConfig
        from hf_control_ft.utils.config_cli import parse_flags

        flags = {f.name: f for f in dataclasses.fields(ElegantConfig)}
        overrides, _ = parse_flags(flags, ["--" + item for item in args.elegant or []])
        return ElegantConfig.from_dict({**super().elegant_config(args, seed).to_dict(), "alpha": self.alpha},
                                       **overrides)

    def evaluate(self, samples: torch.Tensor, kl: float) -> dict:
        out = super().evaluate(samples, kl)
        if not out["diverged"]:
            mine = fid.sample_summary(self.genuine, samples)  # once, for every alpha's reference
            out["fidelity"] = {f"{a:g}": fid.fidelity_distances(mine, ref) for a, ref in self.references.items()}
        return out


def _job(job):
    method, seed, budget, alpha = job
    task = cf._TASK[0]
    task.alpha = alpha  # a forked worker's copy: ELEGANT's alpha for this run
    res = cf._job((method, seed, budget))
    res["alpha"] = alpha
    return res


def _closest(curve: list, kl: float):
    pts = [p for p in curve if p.get("kl") is not None and "fidelity" in p]
    return min(pts, key=lambda p: abs(p["kl"] - kl), default=None)


def summarise(records: list, alphas, refs: dict) -> dict:
    """Per alpha: floor, pretrained, ELEGANT final, each peer final and at ELEGANT's final KL."""
    out = {}
    for a in alphas:
        key = f"{a:g}"
        block = {"floor": refs[a]["floor"], "pretrained": refs[a]["pretrained"],
                 "acceptance_rate": refs[a]["acceptance_rate"]}
        eleg = [r for r in records if r["method"] == "elegant" and r["alpha"] == a]
        kl_e = None
        if eleg:
            kl_e = sum(r["final"]["kl"] for r in eleg) / len(eleg)
            block["elegant"] = _point_stats([r["final"] for r in eleg], key, a, refs[a]["acceptance_rate"])
        for m in PEERS:
            recs = [r for r in records if r["method"] == m]
            if not recs:
                continue
            finals = [r["final"] for r in recs if not r["final"]["diverged"]]
            block[m] = {"final": _point_stats(finals, key, a, refs[a]["acceptance_rate"]) if finals else None}
            if kl_e is not None:
                block[m]["matched_kl"] = _point_stats([p for p in (_closest(r["curve"], kl_e) for r in recs) if p],
                                                      key, a, refs[a]["acceptance_rate"])
        if eleg and all(m in block for m in PEERS):
            f_e = block["elegant"]["frechet"]["mean"]
            block["goal"] = {"elegant_frechet_over_floor": round(f_e / refs[a]["floor"]["frechet"], 2),
                             "below_every_peer_at_matched_kl": all(
                                 f_e < block[m]["matched_kl"]["frechet"]["mean"] for m in PEERS)}
        out[key] = block
    return out


def path_kl_to_target(point: dict, alpha: float, z: float):
    """``KL(P_model || P*)`` in nats over whole sampling paths, ``P* ∝ P_pre exp(r / alpha)`` the tilted path law:
    ``log Z - E[r] / alpha + KL(P_model || P_pre)`` (the objective's gap to its optimum ``alpha log Z``, divided
    by alpha), with ``Z`` the rejection sampler's acceptance rate; it bounds the KL between the samples' laws."""
    if point.get("reward") is None or point.get("kl") is None:
        return None
    return math.log(z) - point["reward"] / alpha + point["kl"]


def _point_stats(points: list, alpha_key: str, alpha: float, z: float) -> dict:
    stats = {s: _rounded(interval([p["fidelity"][alpha_key][s] for p in points])) for s in SCORES}
    gaps = [g for g in (path_kl_to_target(p, alpha, z) for p in points) if g is not None]
    stats["path_kl_to_target"] = _rounded(interval(gaps)) if gaps else None
    for k in ("kl", "genuine_reward", "genuine_target_rate", "within_class_diversity", "nfe"):
        vals = [p[k] for p in points if p.get(k) is not None]
        stats[k] = _rounded(interval(vals)) if vals else None
    return stats


def _rounded(ci: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ci.items()}


def plot(records: list, summary: dict, alphas, path: str) -> None:
    """One panel per alpha: Fréchet distance to that alpha's exact tilted law against path KL, a line per run;
    the floor and the pretrained model as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(("elegant", *PEERS), ("C0", "C1", "C2", "C3")))
    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 4.2), squeeze=False)
    for ax, a in zip(axes[0], alphas):
        key, seen = f"{a:g}", set()
        for r in records:
            if r["method"] == "elegant" and r["alpha"] != a:
                continue
            pts = [p for p in r["curve"] if "fidelity" in p and p.get("kl")]
            label = None if r["method"] in seen else r["method"] + (f" (alpha {a:g})" if r["method"] == "elegant"
                                                                    else "")
            seen.add(r["method"])
            ax.plot([p["kl"] for p in pts], [p["fidelity"][key]["frechet"] for p in pts], "o-", ms=3,
                    color=colours[r["method"]], alpha=0.8, label=label)
        ax.axhline(summary[key]["floor"]["frechet"], color="k", ls="--", lw=1, label="floor (two exact sets)")
        ax.axhline(summary[key]["pretrained"]["frechet"], color="grey", ls=":", lw=1, label="pretrained")
        ax.set(xscale="log", yscale="log", xlabel="path KL to the pretrained model (nats)",
               ylabel="Fréchet distance (genuine-classifier features)", title=f"target: tilted law at alpha {a:g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--alphas", type=float, nargs="+", default=[3.0, 1.0, 0.3])
    p.add_argument("--methods", nargs="+", default=["elegant", *PEERS], choices=["elegant", *PEERS])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train_steps", type=int, default=240, help="ELEGANT iterations (they set every budget)")
    p.add_argument("--elegant", nargs="+", default=None, metavar="KEY=VALUE",
                   help="ElegantConfig overrides of the shipped digits config, e.g. lr_scheduler=cosine")
    p.add_argument("--budget", type=int, default=None, help="peers' NFE budget when ELEGANT at alpha 1 is not run")
    p.add_argument("--baseline_batch_size", type=int, default=32)
    p.add_argument("--baseline_lr", nargs="+", default=["5e-3"])
    p.add_argument("--truncate", type=int, default=10, help="reward backprop: steps with gradients (last K)")
    p.add_argument("--eval_points", type=int, default=12)
    p.add_argument("--eval_samples", type=int, default=2048, help="samples per evaluation = exact set size")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the digits config's 15)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--png", default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--from_json", default=None,
                   help="summarise (and plot) this earlier output again instead of running")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            report(json.load(f), args.png)
        return
    if args.quick:
        args.train_steps, args.eval_points = 6, 3
    with contextlib.redirect_stdout(sys.stderr):
        task = FidelityDigits(quick=args.quick, cache_dir=args.cache_dir).build()
    task.steps = args.steps or task.steps
    t0 = time.perf_counter()
    refs = task.build_references(args.alphas, args.eval_samples)
    cf._TASK[:] = [task]
    cf._ARGS = args
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    run = pool.map if pool else lambda f, jobs: [f(j) for j in jobs]
    records = []
    if "elegant" in args.methods:
        records += run(_job, [("elegant", s, 0, a) for a in args.alphas for s in args.seeds])
    at_one = [r["final"]["nfe"] for r in records if r["alpha"] == 1.0]
    budget = int(sum(at_one) / len(at_one)) if at_one else args.budget or args.train_steps * 1200
    records += run(_job, [(m, s, budget, 1.0) for m in args.methods if m in PEERS for s in args.seeds])
    if pool:
        pool.close()
    out = {"benchmark": "digits_fidelity", "task_info": task.describe(), "alphas": args.alphas, "seeds": args.seeds,
           "eval_samples": args.eval_samples, "nfe_budget": budget, "elegant_overrides": args.elegant,
           "baseline_batch_size": args.baseline_batch_size, "baseline_lr": args.baseline_lr,
           "wall_seconds": round(time.perf_counter() - t0, 1),
           "references": {f"{a:g}": refs[a] for a in args.alphas}, "records": records}
    report(out, args.png)


def report(out: dict, png: str | None) -> None:
    """Summarises ``out`` (its records and references), prints the table (stderr) and the JSON (stdout), plots."""
    alphas = out["alphas"]
    refs = {a: out["references"][f"{a:g}"] for a in alphas}
    summary = out["summary"] = summarise(out["records"], alphas, refs)
    for key, block in summary.items():
        rows = [("floor", block["floor"]), ("pretrained", block["pretrained"])]
        rows += [(m, block[m]["final"] if m in PEERS else block[m]) for m in ("elegant", *PEERS) if m in block]
        rows += [(f"{m}@KL", block[m]["matched_kl"]) for m in PEERS if m in block and "matched_kl" in block[m]]
        for name, s in rows:
            if s is None:
                continue
            vals = "  ".join(f"{k} {s[k]['mean'] if isinstance(s[k], dict) else s[k]:.4g}" for k in SCORES)
            kl, gap = s.get("kl"), s.get("path_kl_to_target")
            print(f"alpha {key:4s} {name:22s} {vals}" + (f"  KL {kl['mean']:.3g}" if kl else "")
                  + (f"  KL to target {gap['mean']:.3g}" if gap else ""), file=sys.stderr)
    print(markdown(summary), file=sys.stderr)
    if png:
        plot(out["records"], summary, alphas, png)
    print(json.dumps(out))


def _cell(stats, key: str, digits: int = 2) -> str:
    s = stats.get(key) if stats else None
    if not s:
        return ""
    if s.get("ci95_low") is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['ci95_low']:.{digits}f}, {s['ci95_high']:.{digits}f}]"


def markdown(summary: dict) -> str:
    """The summary as one markdown table: per alpha the floor, the pretrained model, ELEGANT and every peer at
    its final point and at ELEGANT's KL (means and 95% intervals over seeds)."""
    lines = ["| target alpha | samples | Fréchet | kernel MMD^2 | two-sample acc. | class TV | path KL to pretrained "
             "| path KL to target |", "|---|---|---|---|---|---|---|---|"]
    for key, block in summary.items():
        rows = [("exact (floor)", {k: {"mean": v} for k, v in block["floor"].items()}),
                ("pretrained", {**{k: {"mean": v} for k, v in block["pretrained"].items()}, "kl": {"mean": 0.0},
                                "path_kl_to_target": {"mean": -math.log(block["acceptance_rate"])}})]
        if "elegant" in block:
            rows.append((f"ELEGANT (alpha {key})", block["elegant"]))
        for m in PEERS:
            if m in block:
                if key == "1":
                    rows.append((f"{m}, final", block[m]["final"]))
                if "matched_kl" in block[m]:
                    rows.append((f"{m}, at ELEGANT's KL", block[m]["matched_kl"]))
        for name, st in rows:
            lines.append(f"| {key} | {name} | {_cell(st, 'frechet', 1)} | {_cell(st, 'mmd2', 2)} | "
                         f"{_cell(st, 'c2st', 3)} | {_cell(st, 'class_tv', 3)} | {_cell(st, 'kl', 1)} | "
                         f"{_cell(st, 'path_kl_to_target', 1)} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
