"""Feedback efficiency of SEIKO on a Gaussian mixture with a known true reward and feasibility region.

Task (``docs/algorithms.md`` §6): the pretrained model is an MLP denoiser distilled from a 2-D three-mode mixture in
which the mode nearest the reward peak is *rare* (weight 0.04). The true reward ``r(x) = -||x - p||^2 / 4``
peaks at ``p = (0, 7.5)``, off the data manifold (2.3 units = 4.6 mode std above the rare mode). The oracle
returns ``r(x) + N(0, 0.5^2)``. A sample is *feasible* if it lies within ``k = 3`` standard deviations (1.5
units) of some mode mean: leaving the manifold for the reward peak is the failure SEIKO's KL to the pretrained
model must prevent.

Methods: UCB, Bootstrap, Thompson sampling, Greedy (all ``num_rounds`` rounds with growing budgets) and the
non-adaptive baseline (the whole budget in one round from the pretrained model, and the same total number of
drift iterations). After every round the current model is sampled and scored with the *true* reward. Output:
JSON on stdout (and ``--json``) and a PNG of true reward and feasible fraction vs. oracle queries.

    OMP_NUM_THREADS=1 python benchmarks/seiko_feedback.py [--quick] [--seeds 0 1 2] [--methods ucb greedy]
        [--bonus_scale 1.0] [--png outputs/seiko_feedback.png] [--json outputs/seiko_feedback.json]

Default (full) run: 4 rounds of 32/64/128/256 queries, seeds 0 and 1, about 10 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import DDPMScheduler  # noqa: E402

from hf_control_ft.tasks.gaussian_mixture import GaussianMixture, distill_mixture_denoiser  # noqa: E402
from hf_control_ft.trainers.seiko import SeikoTrainer  # noqa: E402
from hf_control_ft.trainers.seiko_config import SeikoConfig  # noqa: E402

MODE_STD = 0.5
PEAK = torch.tensor([0.0, 7.5])
FEASIBLE_K = 3.0
NOISE_STD = 0.5
ALPHA, BETA = 1.0, 1.0
METHODS = ("ucb", "bootstrap", "ts", "greedy", "non-adaptive")


def benchmark_mixture() -> GaussianMixture:
    means = [[-3.0, 0.0], [3.0, 0.0], [0.0, 5.2]]
    return GaussianMixture([0.6, 0.36, 0.04], means, (MODE_STD**2 * torch.eye(2)).expand(3, 2, 2).clone())


def true_reward(x: torch.Tensor) -> torch.Tensor:
    return -(x - PEAK.to(x)).pow(2).sum(1) / 4.0


def feasible(x: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    return torch.cdist(x.double(), mixture.means).min(1).values <= FEASIBLE_K * MODE_STD


class NoisyOracle:
    """``r(x) + N(0, NOISE_STD^2)`` with its own seeded noise stream (non-differentiable: returns a list)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.__name__ = "noisy_true_reward"

    def __call__(self, samples, prompts):
        noise = NOISE_STD * torch.randn(samples.shape[0], generator=self.gen)
        return (true_reward(samples) + noise).tolist()


def settings(quick: bool) -> dict:
    if quick:
        return dict(budgets=[16, 32, 64], steps=10, train_steps=15, eval_n=512, distill_steps=800, value_rollouts=256,
                    initial_noise=True)
    return dict(budgets=[32, 64, 128, 256], steps=10, train_steps=30, eval_n=2048, distill_steps=800,
                value_rollouts=512, initial_noise=True)


def run(method: str, seed: int, denoiser, scheduler, mixture, s: dict, workdir: str,
        bonus_scale: float = 1.0) -> list[dict]:
    adaptive = method != "non-adaptive"
    budgets = s["budgets"] if adaptive else [sum(s["budgets"])]
    cfg = SeikoConfig(
        num_rounds=len(budgets), queries_per_round=budgets, optimism=method if adaptive else "greedy",
        alpha=ALPHA, beta=BETA, bonus_scale=bonus_scale, ensemble_size=4, eta=1.0, num_inference_steps=s["steps"],
        train_steps=s["train_steps"] * (1 if adaptive else len(s["budgets"])), batch_size=64, learning_rate=3e-3,
        lora_rank=8, learn_initial_noise=s["initial_noise"], value_num_rollouts=s["value_rollouts"], value_train_steps=150,
        noise_train_steps=60, noise_batch_size=128, noise_num_steps=10, aux_hidden=64, reward_hidden=32,
        reward_train_steps=200, oracle_batch_size=32, seed=seed, report_to=None,
        output_dir=os.path.join(workdir, f"{method}-{seed}"))
    curve = []

    def evaluate(trainer, round_index):
        x = trainer.sample(s["eval_n"], torch.Generator().manual_seed(777), batch_size=1024)
        point = {"round": round_index, "queries": len(trainer.feedback),
                 "true_reward": float(true_reward(x).mean()), "feasible": float(feasible(x, mixture).double().mean()),
                 "rare_mode_weight": float((mixture.assign(x) == 2).double().mean())}
        curve.append(point)
        return {f"eval/{k}": v for k, v in point.items()}

    trainer = SeikoTrainer(config=cfg, model=copy.deepcopy(denoiser), scheduler=scheduler, oracle=NoisyOracle(seed),
                           sample_shape=(2,))
    trainer.train(callback=evaluate)
    return curve


def queries_to_reach(curve: list[dict], target: float):
    for p in curve:
        if p["true_reward"] >= target:
            return p["queries"]
    return None


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    out = []
    for points in zip(*curves):
        out.append({k: sum(p[k] for p in points) / len(points) for k in ("queries", "true_reward", "feasible",
                                                                           "rare_mode_weight")})
    return out


def plot(results: dict, pretrained: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, res in results.items():
        xs = [0] + [p["queries"] for p in res["mean_curve"]]
        axes[0].plot(xs, [pretrained["true_reward"]] + [p["true_reward"] for p in res["mean_curve"]], "o-", label=method)
        axes[1].plot(xs, [pretrained["feasible"]] + [p["feasible"] for p in res["mean_curve"]], "o-", label=method)
    axes[0].set_xlabel("oracle queries")
    axes[0].set_ylabel("true reward of samples (mean over seeds)")
    axes[1].set_xlabel("oracle queries")
    axes[1].set_ylabel(f"fraction feasible (within {FEASIBLE_K:g} std of a mode)")
    axes[1].axhline(0.95, color="gray", ls="--", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small budgets and few iterations (smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bonus_scale", type=float, default=1.0, help="C of the UCB / bootstrap bonus")
    parser.add_argument("--png", default=os.path.join("outputs", "seiko_feedback.png"))
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    s = settings(args.quick)
    t0 = time.perf_counter()
    mixture = benchmark_mixture()
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    denoiser = distill_mixture_denoiser(mixture, scheduler, steps=s["distill_steps"], batch_size=512, hidden=64,
                                        depth=2, seed=0, progress=False)
    workdir = tempfile.mkdtemp(prefix="seiko_bench_")
    try:
        # the pretrained model's own scores (0 queries): sample it through a trainer with no rounds run
        probe = SeikoTrainer(config=SeikoConfig(num_rounds=1, queries_per_round=1, num_inference_steps=s["steps"],
                                                eta=1.0, report_to=None, output_dir=os.path.join(workdir, "probe")),
                             model=copy.deepcopy(denoiser), scheduler=scheduler, oracle=NoisyOracle(0),
                             sample_shape=(2,))
        x = probe.sample(s["eval_n"], torch.Generator().manual_seed(777), batch_size=1024, controlled=False)
        pretrained = {"true_reward": float(true_reward(x).mean()), "feasible": float(feasible(x, mixture).double().mean()),
                      "rare_mode_weight": float((mixture.assign(x) == 2).double().mean())}
        results = {}
        for method in args.methods:
            curves = []
            for seed in seeds:
                tm = time.perf_counter()
                curves.append(run(method, seed, denoiser, scheduler, mixture, s, workdir, args.bonus_scale))
                print(f"[{time.perf_counter() - t0:7.1f}s] {method} seed {seed}: {curves[-1][-1]} "
                      f"({time.perf_counter() - tm:.1f}s)", file=sys.stderr, flush=True)
            mc = mean_curve(curves)
            results[method] = {"curves": curves, "mean_curve": mc, "final_true_reward": mc[-1]["true_reward"],
                               "min_feasible": min(p["feasible"] for c in curves for p in c),
                               "total_queries": mc[-1]["queries"]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {"settings": {**s, "seeds": seeds, "alpha": ALPHA, "beta": BETA, "bonus_scale": args.bonus_scale, "noise_std": NOISE_STD,
                            "feasible_k_std": FEASIBLE_K, "peak": PEAK.tolist()},
               "pretrained": pretrained, "results": results, "runtime_s": time.perf_counter() - t0}
    if "ucb" in results and "greedy" in results:
        target = results["greedy"]["final_true_reward"]
        q = queries_to_reach(results["ucb"]["mean_curve"], target)
        summary["target_check"] = {
            "greedy_final_true_reward": target, "greedy_total_queries": results["greedy"]["total_queries"],
            "ucb_queries_to_reach_greedy_final": q,
            "ucb_query_ratio": None if q is None else q / results["greedy"]["total_queries"],
            "ucb_min_feasible": results["ucb"]["min_feasible"],
            "target_met": q is not None and q <= 0.5 * results["greedy"]["total_queries"]
            and results["ucb"]["min_feasible"] >= 0.95}
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(results, pretrained, args.png)
    summary["png"] = args.png
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
