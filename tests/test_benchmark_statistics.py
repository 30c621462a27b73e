"""The statistics of benchmarks/seiko_feedback.py: t-intervals, the paired difference and the query ratio."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from seiko_feedback import headline, interval, summarise  # noqa: E402


def test_interval_is_the_student_t_interval_of_the_mean():
    ci = interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3 / 4)  # t_{0.975, 3} * sd / sqrt(n)
    assert ci["mean"] == 2.5 and ci["n"] == 4
    assert ci["ci95_low"] == pytest.approx(2.5 - half) and ci["ci95_high"] == pytest.approx(2.5 + half)
    assert interval([5.0])["ci95_low"] is None


def _curve(rewards, queries=(32, 96, 224, 480), feasible=0.97):
    return [{"round": i + 1, "queries": q, "true_reward": r, "feasible": feasible} for i, (q, r) in
            enumerate(zip(queries, rewards))]


def test_headline_ratio_paired_difference_and_goal():
    seeds = [0, 1, 2]
    curves = {"greedy": {s: _curve([-10, -8, -6, -4 + 0.1 * s]) for s in seeds},
              "ucb": {s: _curve([-10, -5, -3.5, -2 + 0.2 * s], feasible=0.96 + 0.01 * s) for s in seeds}}
    table = summarise(curves, seeds)
    assert [r["queries"] for r in table["ucb"]] == [32, 96, 224, 480]
    line = headline(table, curves, seeds)
    # greedy's final mean is -3.9; UCB's mean first reaches it at 224 of greedy's 480 queries
    assert line["ucb_query_ratio_vs_greedy"] == pytest.approx(224 / 480)
    diff = interval([(-2 + 0.2 * s) - (-4 + 0.1 * s) for s in seeds])
    assert line["ucb_minus_greedy_final_mean"] == pytest.approx(2.1)
    assert line["ucb_minus_greedy_final_ci95_low"] == pytest.approx(diff["ci95_low"])
    assert line["min_feasible_fraction"] == pytest.approx(0.96)
    assert line["goal_met"] is True
    curves["ucb"][1][2]["feasible"] = 0.9  # one seed, one round below 95 % feasible: the goal is missed
    assert headline(summarise(curves, seeds), curves, seeds)["goal_met"] is False


def test_found_counts_compare_the_final_region_mass_with_twice_the_pretrained():
    from seiko_feedback import found_counts

    seeds = [0, 1, 2]
    curves = {"ucb": {s: [{"region_fraction": 0.01, "queries_in_region": 1},
                          {"region_fraction": [0.05, 0.02, 0.019][s], "queries_in_region": 2 + s}] for s in seeds}}
    found = found_counts(curves, seeds, {"region_fraction": 0.01})
    assert found == {"ucb": {"found": 2, "seeds": 3, "queries_in_region_mean": 3.0}}
    assert found_counts(curves, seeds, {"true_reward": 0.0}) is None  # tasks without a region
    line = headline(summarise({"ucb": {s: _curve([0.0, 0.0, 0.0, 0.0]) for s in seeds}}, seeds), {}, seeds, found)
    assert line["ucb_found_region_seeds"] == 2


def test_rare_task_reward_is_a_bump_on_the_rare_mode_and_flat_on_the_common_ones():
    import torch
    from seiko_tasks import RareTask, mixture_of

    task = RareTask()
    task.mixture = mixture_of(task.weights)  # build() without distilling the denoiser
    common = task.mixture.sample(4096, torch.Generator().manual_seed(0))
    common = common[task.mixture.assign(common) != 2]
    r = task.true_reward(common)
    assert float(r.max()) < 1e-6  # no slope toward the bump from where the mass is
    half = 0.75 * math.sqrt(2 * math.log(2))  # r = 2 at this distance: the region's edge
    x = torch.tensor([[0.0, 5.2], [0.0, 5.2 + 0.99 * half], [0.0, 5.2 + 1.01 * half]])
    expected = 4.0 * torch.exp(-torch.tensor([0.0, 0.99, 1.01]) ** 2 * math.log(2))
    torch.testing.assert_close(task.true_reward(x), expected)
    assert task.in_region(x).tolist() == [True, True, False]
    assert task.queries_in_region(x) == 2
    assert abs(sum(task.weights) - 1) < 1e-12 and task.weights[2] <= 0.03
