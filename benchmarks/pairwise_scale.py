"""Are people's pairwise preferences on one scale across SEIKO's rounds? (``docs/algorithms.md`` §12)

Simulated raters on the real rating machinery (the queue on disk, the page's pairing, ``HumanOracle``'s fit and
the trainer's refit of earlier rounds): queries of round ``r`` have true values ``shift_r + spread * N(0, 1)``
logits and a rater prefers ``i`` to ``j`` with probability ``sigma(v_i - v_j)``. For each number of comparisons
per query it prints the stored values' round means (after every round's refit), the second round's level above
the first (true: ``shift_2 - shift_1``), and the slope of stored against true values within a round; ``before``
is the replaced fit (each round alone, one virtual win and loss per query against a reference of 0) on the
within-round comparisons.

    python benchmarks/pairwise_scale.py                     # 64 queries a round, 1 / 2 / 4 / 8 comparisons, 5 seeds
    python benchmarks/pairwise_scale.py --spread 2          # true values spread over 2 logits within a round
    python benchmarks/pairwise_scale.py --quick             # a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile

import torch

from hf_control_ft.feedback.human_oracle import HumanOracle
from hf_control_ft.feedback.rating import RatingFiles, RatingScale
from hf_control_ft.feedback.rating_server import RatingBoard

RATERS = ["r0", "r1", "r2", "r3", "r4", "r5"]
PROMPTS = ["a cat", "a dog", "a red car", "the sea"]


def old_fit(num_items: int, comparisons: list[tuple[int, int, float]], iterations: int = 500) -> list[float]:
    """The replaced per-round fit: MAP with one virtual win and loss against a reference of value 0 (Hunter's MM)."""
    wins, pairs = [1.0] * num_items, {}
    for i, j, y in comparisons:
        wins[i] += y
        wins[j] += 1.0 - y
        pairs[(min(i, j), max(i, j))] = pairs.get((min(i, j), max(i, j)), 0.0) + 1.0
    strength = [1.0] * num_items
    for _ in range(iterations):
        den = [2.0 / (s + 1.0) for s in strength]
        for (i, j), n in pairs.items():
            d = n / (strength[i] + strength[j])
            den[i] += d
            den[j] += d
        strength = [w / d for w, d in zip(wins, den)]
    return [math.log(s) for s in strength]


def _slope(fitted: list[float], true: list[float]) -> float:
    mf, mt = statistics.fmean(fitted), statistics.fmean(true)
    cov = sum((f - mf) * (t - mt) for f, t in zip(fitted, true))
    return cov / sum((t - mt) ** 2 for t in true)


def simulate(per_round: int = 64, shifts=(0.0, 3.0), spread: float = 1.0, ratings_per_query: int = 1,
             seed: int = 0) -> dict:
    """One run: returns per-round stored means, the level difference, the within-round slope, and ``before``."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as directory:
        oracle = HumanOracle(directory, ratings_per_query=ratings_per_query, mode="pairwise", value_range=(0, 1))
        files = RatingFiles(directory)
        files.add_raters(RATERS)
        board = RatingBoard(files, RatingScale(), ratings_per_query, mode="pairwise")
        truth, stored, rounds = {}, {}, {}
        g = torch.Generator().manual_seed(seed)
        for r, shift in enumerate(shifts, 1):
            samples = torch.rand(per_round, 16, generator=g)
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(per_round)]
            first = (r - 1) * per_round
            keys = oracle.enqueue(samples, prompts, round_index=r, query_indices=list(range(first, first + per_round)))
            for q, key in enumerate(keys, first):
                truth[key] = shift + spread * rng.gauss(0.0, 1.0)
                rounds[q] = (r, key)
            idle = 0
            while idle < len(RATERS):
                rater = RATERS[rng.randrange(len(RATERS))]
                shown = board.next_for(rater)
                if shown["assignment"] is None:
                    idle += 1
                    continue
                idle = 0
                a, b = board.open[shown["assignment"]][1]
                p = 1.0 / (1.0 + math.exp(-(truth[a] - truth[b])))
                board.submit(rater, {"assignment": shown["assignment"], "better": 0 if rng.random() < p else 1})
            for i, answer in oracle.answers(keys):
                stored[first + i] = answer.value
            stored.update({q: v for q, v in oracle.current_values().items() if rounds[q][0] < r})  # the trainer
        ratings = files.read_lines(files.ratings_path)[0]
    out = {"ratings_per_query": ratings_per_query, "seed": seed}
    for label, values in (("after", stored), ("before", _before(ratings, rounds, len(shifts)))):
        means = [statistics.fmean(values[q] for q, (r, _) in rounds.items() if r == k)
                 for k in range(1, len(shifts) + 1)]
        slopes = [_slope([values[q] for q, (r, _) in rounds.items() if r == k],
                         [truth[key] for q, (r, key) in rounds.items() if r == k]) for k in range(1, len(shifts) + 1)]
        out[label] = {"round_means": [round(m, 3) for m in means], "level_difference": round(means[-1] - means[0], 3),
                      "slope": round(statistics.fmean(slopes), 3)}
    out["true_level_difference"] = shifts[-1] - shifts[0]
    return out


def _before(ratings, rounds, num_rounds) -> dict:
    """The replaced fit: each round alone, on its within-round comparisons."""
    key_round = {key: r for _, (r, key) in rounds.items()}
    values = {}
    for k in range(1, num_rounds + 1):
        qs = [q for q, (r, _) in rounds.items() if r == k]
        index = {rounds[q][1]: i for i, q in enumerate(qs)}
        comps = [(index[x["key"]], index[x["other"]], x["value"]) for x in ratings if x["value"] is not None
                 and key_round.get(x["key"]) == k and key_round.get(x["other"]) == k]
        for q, v in zip(qs, old_fit(len(qs), comps)):
            values[q] = v
    return values


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per_round", type=int, default=64)
    p.add_argument("--comparisons", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--shift", type=float, default=3.0, help="the second round's true level above the first")
    p.add_argument("--spread", type=float, default=1.0, help="standard deviation of the true values within a round")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.per_round, args.comparisons, args.seeds = 16, [1], [0]
    for n in args.comparisons:
        runs = [simulate(args.per_round, (0.0, args.shift), args.spread, ratings_per_query=n, seed=s)
                for s in args.seeds]
        for run in runs:
            print(json.dumps(run))
        summary = {"ratings_per_query": n, "seeds": len(runs), "spread": args.spread}
        for label in ("after", "before"):
            diffs = [r[label]["level_difference"] for r in runs]
            summary[label] = {"level_difference_mean": round(statistics.fmean(diffs), 3),
                              "level_difference_sd": round(statistics.pstdev(diffs), 3),
                              "slope_mean": round(statistics.fmean(r[label]["slope"] for r in runs), 3)}
        print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
