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
