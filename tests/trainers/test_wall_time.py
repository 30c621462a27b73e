"""The run's cost in hours before and while it runs (issue: cost in hours, not only network evaluations)."""

import logging

import pytest

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.testing import ddim, make_mlp_denoiser
from hf_control_ft.trainers.costs import WallTime, hours, network_evaluations


def test_the_estimate_scales_the_measured_throughput_to_what_is_left(monkeypatch):
    cfg = ElegantConfig(num_inference_steps=10, value_num_rollouts=100, batch_size=4, train_steps=50,
                        report_to=None)
    costs = network_evaluations(cfg)  # stage 1: 1,000 evaluations; drift: 50 x 4 x (10 + 20) + 50 x 4 x 20
    clock, now = WallTime(costs, cfg.train_steps), [0.0]
    monkeypatch.setattr("hf_control_ft.trainers.costs.time.perf_counter", lambda: now[0])
    clock.restart()
    now[0] += 2.0
    clock.add(100)  # the first 10 rollouts: 0.02 s per evaluation
    est = clock.estimate()
    assert est["stages_1_2_s"] == pytest.approx(900 * 0.02)
    assert est["drift_s"] == pytest.approx((costs["drift_forward"] + costs["drift_backward"]) * 0.02)
    clock.add(900)
    clock.restart()
    now[0] += 5.0
    clock.add(0, drift_iterations=1)  # a measured drift iteration replaces the evaluation-based guess
    est = clock.estimate(drift_steps_done=1)
    assert est["stages_1_2_s"] == 0 and est["drift_s"] == pytest.approx(49 * 5.0)
    assert hours(49 * 5.0) == "4 min" and hours(7325) == "2 h 02 min" and hours(40) == "40 s"


def test_train_logs_the_estimate_after_the_first_rollouts_and_drift_iteration(tmp_path, caplog):
    cfg = ElegantConfig(num_inference_steps=3, train_steps=3, batch_size=4, value_num_rollouts=8, value_train_steps=2,
                        noise_train_steps=2, noise_batch_size=8, aux_hidden=16, report_to=None, lora_rank=2,
                        drift_objective="pathwise", log_every=1)
    trainer = ElegantTrainer(cfg, make_mlp_denoiser(lora=False), ddim(), lambda x: -x.pow(2).sum(1), (2,))
    with caplog.at_level(logging.INFO, logger="hf_control_ft"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if "estimated wall time left" in r.getMessage()]
    assert len(lines) == 2 and "the first rollouts" in lines[0] and "the first drift iteration" in lines[1]
    assert "stages 1-2" in lines[0] and "total" in lines[0]
    remaining = [h["time/remaining_s"] for h in trainer.history if "time/remaining_s" in h]
    assert len(remaining) == 3 and remaining[-1] == 0
