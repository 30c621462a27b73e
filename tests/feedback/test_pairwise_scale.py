"""Pairwise preferences on one scale across SEIKO's rounds (docs/algorithms.md §12): simulated raters on the real
page machinery; a second round 3 logits better is 3 logits higher in the stored values (it was ~0: each round was
fitted alone around 0), and the values a later round's comparisons change are stored as a new version."""

import math
import os
import sys

import pytest
import torch

from hf_control_ft.feedback.oracle import OracleAnswer
from hf_control_ft.feedback.preferences import bradley_terry
from hf_control_ft.feedback.store import FeedbackDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import pairwise_scale  # noqa: E402


def test_a_round_three_logits_better_is_three_logits_higher():
    runs = [pairwise_scale.simulate(48, (0.0, 3.0), ratings_per_query=2, seed=s) for s in range(3)]
    after = sum(r["after"]["level_difference"] for r in runs) / len(runs)
    before = sum(r["before"]["level_difference"] for r in runs) / len(runs)
    assert abs(after - 3.0) <= 0.6, [r["after"] for r in runs]
    assert abs(before) < 0.1  # the replaced per-round fit: both rounds centred on 0
    assert all(r["after"]["slope"] > 0 for r in runs)


def test_the_fit_is_the_bradley_terry_posterior_mode_on_one_scale():
    """Three groups, every item compared with every other many times: the values recover the true ones (origin: the
    first group's level), whatever the group labels."""
    g = torch.Generator().manual_seed(0)
    true = [0.0, 0.5, -0.5, 2.0, 2.5, 1.5, -1.0, -0.5, -1.5]
    groups = [7, 7, 7, 9, 9, 9, 11, 11, 11]
    comparisons = []
    for i in range(9):
        for j in range(9):
            if i != j:
                for _ in range(60):
                    p = 1 / (1 + math.exp(-(true[i] - true[j])))
                    comparisons.append((i, j, float(torch.rand(1, generator=g) < p)))
    values = bradley_terry(9, comparisons, groups)
    offset = sum(values[:3]) / 3 - sum(true[:3]) / 3
    assert [v - offset for v in values] == pytest.approx(true, abs=0.25)
    assert bradley_terry(0, []) == []
    with pytest.raises(ValueError, match="bad comparison"):
        bradley_terry(2, [(0, 0, 1.0)])


def test_refitted_values_are_stored_as_a_new_version_and_nothing_is_lost(tmp_path):
    fb = FeedbackDataset(str(tmp_path / "fb"), (2,))
    q = fb.add_pending(torch.zeros(3, 2), round_index=1)
    fb.record(q, [OracleAnswer(v, "ok", "", 1) for v in (0.5, -0.5, 0.0)], batch_index=0)
    fb.record([], [], batch_index=1)
    assert fb.revalue({0: 0.7, 1: -0.5, 2: float("nan")}) == 1  # unchanged and non-finite values are left
    again = FeedbackDataset(str(tmp_path / "fb"), (2,))
    assert again.columns["value"] == pytest.approx([0.7, -0.5, 0.0])
    import pyarrow.parquet as pq  # the shards before the refit still hold the earlier values

    shards = sorted(os.listdir(tmp_path / "fb" / "shards"))
    earlier = pq.read_table(tmp_path / "fb" / "shards" / shards[1]).to_pydict()
    assert earlier["value"][:3] == pytest.approx([0.5, -0.5, 0.0])


def test_a_pairwise_seiko_run_stores_every_round_on_the_final_scale(tmp_path):
    """SEIKO with people comparing pairs (simulated raters on the page's board, preferring the brighter sample):
    after round 2 the stored values of round 1 are those of the joint fit (refitted, a new version of their rows),
    and every stored value is the final fit's."""
    import threading

    from hf_control_ft.feedback.human_oracle import HumanOracle
    from hf_control_ft.feedback.rating import RatingFiles, RatingScale
    from hf_control_ft.feedback.rating_server import RatingBoard
    from hf_control_ft.feedback.reader import load_feedback
    from hf_control_ft.testing import ddpm, make_mlp_denoiser
    from hf_control_ft.trainers.seiko import SeikoTrainer
    from hf_control_ft.trainers.seiko_config import SeikoConfig
    from hf_control_ft.utils.images import from_png

    out = str(tmp_path / "run")
    config = SeikoConfig(num_rounds=2, queries_per_round=6, alpha=1.0, beta=1.0, optimism="ucb", ensemble_size=2,
                         num_inference_steps=4, train_steps=2, batch_size=6, lora_rank=2, value_num_rollouts=8,
                         value_train_steps=3, noise_num_steps=3, noise_train_steps=2, noise_batch_size=8,
                         aux_hidden=16, reward_hidden=8, reward_train_steps=10, report_to=None, output_dir=out)
    oracle = HumanOracle(out, ratings_per_query=2, mode="pairwise", value_range=(-2.0, 2.0), poll_interval=0.05)
    trainer = SeikoTrainer(config, make_mlp_denoiser(dim=16, hidden=16, lora=False), ddpm(), oracle, (16,))
    done, after_round_1 = threading.Event(), {}

    def raters():
        files = RatingFiles(out)
        files.add_raters(["r0", "r1", "r2"])
        board = RatingBoard(files, RatingScale(), 2, mode="pairwise")
        brightness = {}
        while not done.is_set():
            for rater in ("r0", "r1", "r2"):
                shown = board.next_for(rater)
                if shown["assignment"] is None:
                    continue
                keys = board.open[shown["assignment"]][1]
                for k in keys:
                    if k not in brightness:
                        with open(f"{files.images_dir}/{k}.png", "rb") as f:
                            brightness[k] = float(from_png(f.read()).mean())
                better = int(brightness[keys[1]] > brightness[keys[0]])
                board.submit(rater, {"assignment": shown["assignment"], "better": better})
            done.wait(0.02)

    thread = threading.Thread(target=raters, daemon=True)
    thread.start()
    try:
        trainer.train(callback=lambda t, i: after_round_1.update(load_feedback(out).to_dict()) or {} if i == 1 else {})
    finally:
        done.set()
        thread.join(10)
    final = load_feedback(out)
    assert final["status"] == ["ok"] * 12
    current = oracle.current_values()
    assert sorted(current) == list(range(12))
    assert final["value"] == pytest.approx([current[q] for q in final["query_index"]])
    assert final["value"][:6] != pytest.approx(after_round_1["value"][:6])  # round 1 refitted with round 2
