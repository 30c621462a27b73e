"""Optimiser levers of the drift stage on the exact-target cases: which settings close ELEGANT's under-tilt?

Each ``--setting`` is a name and overrides on top of ``benchmarks/tilted_target.py``'s run (default objective,
50 steps, 400 iterations of 128, learned initial noise): the ``ElegantConfig`` fields ``learning_rate``,
``lr_scheduler``, ``lr_warmup_steps``, ``adam_beta1``, ``adam_beta2``, ``max_grad_norm``, ``drift_objective``,
``regression_weight_power``, and two of this script: ``pathwise_every=N`` (every N-th iteration takes the exact
pathwise gradient instead of the regression) and ``init_from_floor=1`` (the drift starts at the discretisation
floor's adapter, the LoRA regressed onto the exact target, instead of zero control). Every setting runs on every
``--rows`` entry (``case:eta``) and ``--seeds``, and is scored by the mode-weight TV of 8192 samples to the
exact tilted target (``benchmarks/tilted_cases.py``). No setting may use more network evaluations than the
default: ``train_steps`` and ``batch_size`` are not overridable here.

    OMP_NUM_THREADS=1 python benchmarks/tilted_levers.py --workers 2 \\
        --rows linear_2d:0.2 bounded_3d:0.3 --seeds 0 \\
        --setting default \\
        --setting cosine3e-3:learning_rate=3e-3,lr_scheduler=cosine,lr_warmup_steps=40 \\
        --setting beta2_0.99:adam_beta2=0.99

Prints one JSON object: per setting and row the TV of every seed, their mean and 95% t-interval, the mode
weights of seed 0's samples, and the TV of the trained drift run from the exact optimal start law
(:func:`exact_start_tv`: the start law's share of the error); a table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tilted_target  # noqa: E402
from bench_stats import interval  # noqa: E402
from tilted_cases import CASES, build_case, discretisation_floor, evaluate  # noqa: E402

from hf_control_ft import ElegantTrainer  # noqa: E402

FORBIDDEN = ("train_steps", "batch_size", "num_inference_steps", "value_num_rollouts")
_CASES: dict = {}


def parse_setting(text: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})`` (numbers parsed, the rest kept as text)."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in FORBIDDEN:
            raise SystemExit(f"--setting {text!r}: {key} changes the network evaluations; not a lever here")
        try:
            overrides[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            overrides[key] = value
    return name, overrides


class _Args:
    """``tilted_target.parse_args`` defaults with a setting's overrides (``run_setting`` reads these names)."""

    NAMES = {"learning_rate": "lr", "lr_scheduler": "lr_scheduler", "lr_warmup_steps": "lr_warmup_steps",
             "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2", "max_grad_norm": "max_grad_norm",
             "drift_objective": None, "pathwise_every": None, "regression_weight_power": "regression_weight_power",
             "init_from_floor": None}

    def __init__(self, overrides: dict, eval_samples: int, quick: bool = False):
        self.__dict__.update(vars(tilted_target.parse_args(["--quick"] if quick else [])))
        self.eval_samples = min(eval_samples, self.eval_samples) if quick else eval_samples
        self.objective = overrides.get("drift_objective", "auto")
        for key, value in overrides.items():
            if key not in self.NAMES:
                raise SystemExit(f"--setting: unknown lever {key!r}; one of {sorted(self.NAMES)}")
            if self.NAMES[key]:
                setattr(self, self.NAMES[key], value)


def mix_in_pathwise(every: int):
    """Every ``every``-th drift iteration of the value-guided objective uses the exact pathwise gradient instead
    (same rollout size; the pathwise step also pulls the pretrained network's input gradient back). Patches
    ``ElegantTrainer.drift_step``; returns the plain method, which :func:`_job` puts back after its run."""
    plain = ElegantTrainer.drift_step

    def drift_step(self, optimizer, params):
        if self.global_step % every != every - 1 or self.config.drift_objective != "value_guided":
            return plain(self, optimizer, params)
        self.config.drift_objective = "pathwise"
        try:
            return plain(self, optimizer, params)
        finally:
            self.config.drift_objective = "value_guided"

    ElegantTrainer.drift_step = drift_step
    return plain


@torch.no_grad()
def exact_start_tv(case: dict, trainer, n: int, proposals: int = 8) -> dict:
    """The trained drift run from the *exact* optimal start law instead of the learned one: TV of its samples.

    ``nu*(x_T) ∝ N(x_T; 0, I) E_pre[exp(r(x_0) / alpha) | x_T]`` is sampled by importance resampling: draw
    ``proposals * n`` pretrained paths from ``N(0, I)`` and keep ``n`` of their starts with probability ∝
    ``exp(r(x_0) / alpha)`` (the path's own end), which leaves starts distributed as ``nu*``. The controlled chain
    then runs from them with fresh noise. Against the run's TV this separates the start law's error from the
    drift's: with an optimal drift this TV is at the floor."""
    gen = torch.Generator().manual_seed(4321)
    dim = case["mixture"].dim
    x_T = torch.randn(proposals * n, dim, generator=gen)
    x_0 = torch.cat([trainer.sampler.sample(x_T[i:i + 8192], gen, controlled=False)
                     for i in range(0, len(x_T), 8192)])
    logw = case["reward"](x_0).double() / case["alpha"]
    w = torch.softmax(logw, 0)
    picks = torch.multinomial(w, n, replacement=True, generator=gen)
    x = torch.cat([trainer.sampler.sample(x_T[picks[i:i + 8192]], gen, controlled=True) for i in range(0, n, 8192)])
    return {"exact_start": evaluate(case["target"], x), "exact_start_ess": round(float(1 / w.pow(2).sum()), 1)}


def _job(job):
    torch.set_num_threads(1)
    name, overrides, case_name, eta, seed, eval_samples, quick = job
    args = _Args(overrides, eval_samples, quick)
    plain = mix_in_pathwise(int(overrides["pathwise_every"])) if overrides.get("pathwise_every") else None
    t0 = time.perf_counter()
    lora_init = None
    if overrides.get("init_from_floor"):  # start at the regression onto the exact target: does the drift stay?
        lora_init = {}
        floor = discretisation_floor(_CASES[case_name], eta, args.steps, args.floor_steps, args.floor_lr,
                                     args.eval_samples, args.seed, lora_state=lora_init)
    try:
        case = _CASES[case_name]
        res = tilted_target.run_setting(case, args, eta, "learned", args.objective, seed, lora_init,
                                        after_train=lambda tr: exact_start_tv(case, tr, args.eval_samples))
        if lora_init is not None:
            res["start_tv"] = floor["tv"]
    finally:  # undo the patches: a pool worker runs the next job in the same process
        if plain is not None:
            ElegantTrainer.drift_step = plain
    print(f"done {name} {case_name}:{eta} seed {seed}: tv {res['samples']['tv']} ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr, flush=True)
    return job, res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=["linear_2d:0.2", "bounded_3d:0.3"], help="case:eta entries")
    p.add_argument("--setting", action="append", default=None, help="name:key=value,... (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval_samples", type=int, default=8192)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tilted_target.py's --quick sizes (a smoke test)")
    args = p.parse_args(argv)
    settings = [parse_setting(s) for s in (args.setting or ["default"])]
    rows = [(r.split(":")[0], float(r.split(":")[1])) for r in args.rows]
    for case_name, _ in rows:
        if case_name not in CASES:
            raise SystemExit(f"--rows: unknown case {case_name!r}; one of {sorted(CASES)}")
        if case_name not in _CASES:
            _CASES[case_name] = build_case(case_name, distill_steps=300 if args.quick else 1500,
                                           num_reference=200_000 if args.quick else 1_000_000)
    todo = [(n, o, c, e, s, args.eval_samples, args.quick) for n, o in settings for c, e in rows for s in args.seeds]
    t0 = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            done = list(pool.imap_unordered(_job, todo))
    else:
        done = [_job(j) for j in todo]
    out = {}
    for (name, overrides, case_name, eta, seed, *_), res in sorted(done, key=lambda d: d[0][4]):  # by seed
        block = out.setdefault(name, {"overrides": overrides, "rows": {}})
        row = block["rows"].setdefault(f"{case_name}:{eta}", {"tv": [], "seeds": []})
        row["tv"].append(res["samples"]["tv"])
        row["seeds"].append(seed)
        row.setdefault("mode_weights", res["samples"]["mode_weights"])
        row.setdefault("drift_objective", res["drift_objective"])
        row.setdefault("exact_start_tv", []).append(res["exact_start"]["tv"])
        if "start_tv" in res:
            row.setdefault("start_tv", []).append(res["start_tv"])
    lines = []
    for name, block in out.items():
        for row_name, row in block["rows"].items():
            ci = interval(row["tv"])
            row.update(tv_mean=round(ci["mean"], 4),
                       tv_ci95=None if ci["ci95_low"] is None
                       else [round(ci["ci95_low"], 4), round(ci["ci95_high"], 4)])
            lines.append(f"{name:28s} {row_name:22s} tv {row['tv_mean']:.4f} {row['tv']}  from the exact start "
                         f"{row['exact_start_tv']}")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps({"benchmark": "tilted_levers", "seeds": args.seeds,
                      "wall_seconds": round(time.perf_counter() - t0),
                      "settings": out}))


if __name__ == "__main__":
    main()
