"""SEIKO: oracle wrapper, feedback dataset, reward ensemble, config, trainer and crash-resume with SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hf_control_ft.feedback.oracle import BudgetExceededError, Oracle, RoundBudget
from hf_control_ft.feedback.store import FeedbackDataset
from hf_control_ft.models.reward_ensemble import OptimisticReward, RewardEnsemble
from hf_control_ft.trainers.seiko_config import SeikoConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "helpers")


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, field", [
    ({"num_rounds": 0}, "num_rounds"),
    ({"num_rounds": 3, "queries_per_round": [4, 4]}, "queries_per_round"),
    ({"queries_per_round": [4, 0, 4, 4]}, "queries_per_round"),
    ({"queries_per_round": 2.5}, "queries_per_round"),
    ({"beta": 0.0}, "beta"),
    ({"optimism": "softmax"}, "optimism"),
    ({"bonus_scale": -1.0}, "bonus_scale"),
    ({"optimism": "bootstrap", "ensemble_size": 1}, "ensemble_size"),
    ({"ucb_ridge": 0.0}, "ucb_ridge"),
    ({"oracle_on_failure": "ignore"}, "oracle_on_failure"),
    ({"oracle_max_retries": -1}, "oracle_max_retries"),
    ({"alpha": -1.0}, "alpha"),  # inherited ELEGANT field
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"Config\.{field}:"):
        SeikoConfig(**kw)


def test_config_budgets_roundtrip_and_elegant_subset(tmp_path):
    cfg = SeikoConfig(num_rounds=3, queries_per_round=[10, 20, 40], beta=0.5, alpha=2.0, report_to=None)
    assert cfg.budgets() == [10, 20, 40]
    assert SeikoConfig(num_rounds=2, queries_per_round=7).budgets() == [7, 7]
    cfg.save(tmp_path / "c.json")
    assert SeikoConfig.load(tmp_path / "c.json") == cfg
    ecfg = cfg.elegant_config()
    assert type(ecfg).__name__ == "ElegantConfig" and ecfg.alpha == 2.0 and not hasattr(ecfg, "beta")
    with pytest.raises(ValueError, match="unknown SeikoConfig keys"):
        SeikoConfig.from_dict({"num_round": 3})


# ---------------------------------------------------------------------------------------------- oracle
def test_oracle_records_failures_and_retries():
    calls = []

    def flaky(samples, prompts):
        calls.append(samples.shape[0])
        if (samples[:, 0] > 10).any():
            raise RuntimeError("assay crashed")
        v = samples.sum(1).clone()
        v[samples[:, 1] < -10] = float("nan")
        return v

    x = torch.tensor([[1.0, 1.0], [20.0, 0.0], [0.0, -20.0], [2.0, 3.0]])
    skip = Oracle(flaky, on_failure="skip").query(x)
    assert [a.status for a in skip] == ["ok", "failed", "failed", "ok"]
    assert skip[0].value == 2.0 and skip[3].value == 5.0 and math.isnan(skip[1].value)
    assert "assay crashed" in skip[1].error and "nan" in skip[2].error
    # attempts count every send: the raising batch call, then each item alone
    assert [a.attempts for a in skip] == [2, 2, 2, 2]
    assert calls == [4, 1, 1, 1, 1]  # the raising batch is split into single items
    retry = Oracle(flaky, on_failure="retry", max_retries=2)
    answers = retry.query(x)
    assert [a.attempts for a in answers] == [2, 6, 6, 2]
    # batch (raises) + split, then per retry: the two failures as a batch (raises) + split
    assert retry.num_item_attempts == (4 + 4) + 2 * (2 + 2) == sum(a.attempts for a in answers)
    with pytest.raises(ValueError, match="returned 1 values for 4 samples"):
        Oracle(lambda s, p: [0.0]).query(x)  # a wrong answer length is a bug of the oracle: loud


def test_round_budget():
    b = RoundBudget([3, 5], num_rounds=2)
    assert b[1] == 3 and b[2] == 5 and b.total == 8
    b.check(2, 2, 3)
    with pytest.raises(BudgetExceededError, match="budget 5"):
        b.check(2, 3, 3)


# ---------------------------------------------------------------------------------------------- feedback
# ---------------------------------------------------------------------------------------------- reward ensemble
def _toy_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, torch.sin(2 * x[:, 0]) + x[:, 1] ** 2 + 0.05 * torch.randn(n, generator=g)


def test_ucb_bonus_shrinks_as_data_grows():
    x, y = _toy_data(200, 0)
    ens = RewardEnsemble((2,), ensemble_size=2, hidden=16)
    ens.fit(x[:50], y[:50], bootstrap=False, steps=200, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 2
    widths = []
    for n in (10, 50, 200):
        ens.fit_gram(x[:n], ridge=1.0)
        widths.append(ens.ucb_width(probe))
    assert (widths[1] <= widths[0] + 1e-6).all() and (widths[2] <= widths[1] + 1e-6).all()
    assert widths[2].mean() < 0.6 * widths[0].mean()
    # the Gram matrix (not a centred covariance): duplicating the data shrinks the bonus by ~sqrt(2)
    ens.fit_gram(torch.cat([x[:200]] * 2), ridge=1e-6)
    w2 = ens.ucb_width(probe)
    ens.fit_gram(x[:200], ridge=1e-6)
    torch.testing.assert_close(w2 * math.sqrt(2), ens.ucb_width(probe), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("kind", ["ucb", "bootstrap", "ts", "greedy"])
def test_optimistic_reward_is_differentiable_and_has_the_right_bonus(kind):
    x, y = _toy_data(80, 2)
    ens = RewardEnsemble((2,), ensemble_size=3, hidden=16)
    ens.fit(x, y, bootstrap=kind in ("bootstrap", "ts"), steps=150, generator=torch.Generator().manual_seed(0))
    ens.fit_gram(x)
    reward = OptimisticReward(ens, kind, bonus_scale=2.0, head=1 if kind == "ts" else None, bonus_cap=None,
                              temperature=1.5)
    probe = torch.randn(16, 2, requires_grad=True)
    out = reward(probe)
    (grad,) = torch.autograd.grad(out.sum(), probe)
    assert out.shape == (16,) and torch.isfinite(grad).all() and grad.abs().max() > 0
    preds, _ = ens.head_outputs(probe.detach())
    r_hat, bonus = reward.parts(probe.detach())
    if kind == "ts":
        torch.testing.assert_close(r_hat, preds[1])
    else:
        torch.testing.assert_close(r_hat, preds.mean(0))
    if kind in ("ts", "greedy"):
        assert torch.equal(bonus, torch.zeros(16))
    elif kind == "bootstrap":
        torch.testing.assert_close(bonus, 2.0 * preds.std(0, unbiased=False))
    else:
        torch.testing.assert_close(bonus, 2.0 * 1.5 * ens.ucb_width(probe.detach()))  # C * tau * width
        assert (bonus > 0).all()
    # the fit is a regression, not a placeholder: in-sample error well below the data spread
    assert float((ens(x) - y).pow(2).mean().sqrt()) < 0.5 * float(y.std())


@pytest.mark.parametrize("kind", ["ucb", "bootstrap"])
def test_ucb_bonus_does_not_shrink_with_the_oracle_noise_and_bootstrap_follows_the_values(kind):
    """The UCB bonus is in nats of tilt (C * tau * width): the same data with values 10x smaller (a flat reward seen
    through small noise) leaves it unchanged, where a bonus in units of the values' spread would shrink 10x. The
    bootstrap spread is in reward units and scales with the values, under the same cap of bonus_cap * tau."""
    x, y = _toy_data(80, 2)
    bonuses = []
    for scale in (1.0, 0.1):
        ens = RewardEnsemble((2,), ensemble_size=3, hidden=16)
        ens.fit(x, scale * y, bootstrap=kind == "bootstrap", steps=150, generator=torch.Generator().manual_seed(0))
        ens.fit_gram(x)
        reward = OptimisticReward(ens, kind, bonus_scale=1.0, bonus_cap=3.0, temperature=2.0)
        with torch.no_grad():
            bonuses.append(reward.parts(3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1)))[1])
    if kind == "ucb":
        torch.testing.assert_close(bonuses[1], bonuses[0], rtol=1e-4, atol=1e-6)
    else:
        assert float(bonuses[1].mean()) < 0.2 * float(bonuses[0].mean())
    assert float(bonuses[0].max()) <= 3.0 * 2.0 * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------- trainer + crash
def _read_log(path):
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f]


@pytest.mark.slow
def test_sigkill_mid_round_resumes_without_losing_or_repeating_queries(tmp_path):
    sys.path.insert(0, HERE)
    from seiko_child import LoggingOracle, build_trainer, tiny_config

    out, log, block = tmp_path / "run", tmp_path / "answers.jsonl", tmp_path / "blocked"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, os.path.join(HERE, "seiko_child.py"), str(out), str(log), str(block)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not block.exists():
            if child.poll() is not None:
                raise AssertionError(f"child exited early: {child.stderr.read().decode()[-3000:]}")
            assert time.time() < deadline, "child never reached round 2"
            time.sleep(0.2)
        # a requeued job / second trainer on the live directory is refused before it reads anything stale
        from hf_control_ft.utils.run_lock import RunLockedError

        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
            build_trainer(out, LoggingOracle(str(tmp_path / "stale.jsonl")))
        assert not (tmp_path / "stale.jsonl").exists()
        os.kill(child.pid, signal.SIGKILL)  # killed during round 2's second oracle call
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()

    before = FeedbackDataset(str(out / "feedback"), (2,))
    answered_before = {q: (before.columns["value"][q], before.columns["status"][q], before.columns["timestamp"][q])
                       for q in range(len(before)) if before.columns["status"][q] != "pending"}
    assert len(before) == 24 and len(answered_before) == 12 + 5  # round 1 + the first batch of round 2
    assert before.pending(2) == list(range(17, 24))
    logged_before = _read_log(log)
    assert len(logged_before) == 17

    oracle = LoggingOracle(str(log))
    trainer = build_trainer(out, oracle)
    assert trainer.completed_rounds == 1 and trainer.global_step == tiny_config(out).train_steps
    pending_samples = [tuple(v) for v in trainer.feedback.samples(trainer.feedback.pending(2)).tolist()]
    trainer.train()
    assert trainer.completed_rounds == 3 and trainer.global_step == 3 * tiny_config(out).train_steps
    fb = trainer.feedback
    assert len(fb) == 32 and fb.pending() == [] and [fb.num_submitted(i) for i in (1, 2, 3)] == [12, 12, 8]
    for q, kept in answered_before.items():  # nothing obtained before the kill was lost or overwritten
        now = (fb.columns["value"][q], fb.columns["status"][q], fb.columns["timestamp"][q])
        assert now == kept or (math.isnan(now[0]) and math.isnan(kept[0]) and now[1:] == kept[1:])
    logged = _read_log(log)
    assert len(logged) == 32 and len(set(logged)) == 32  # every sample answered exactly once
    assert set(logged[17:17 + 7]) == set(pending_samples)  # the resumed run first asked the pending ones
    dataset_samples = {tuple(v) for v in fb.samples(list(range(32))).tolist()}
    assert dataset_samples == set(logged)
    assert oracle.calls == math.ceil(7 / 5) + math.ceil(8 / 5)
    assert "failed" in fb.columns["status"] and "ok" in fb.columns["status"]
    with open(out / "trainer_state" / "current") as f:
        state_dir = out / "trainer_state" / f.read().strip()
    with open(state_dir / "state.json") as f:
        state = json.load(f)
    assert state["completed_rounds"] == 3 and (state_dir / "adapter_previous.safetensors").exists()
    assert trainer.history and any("train/kl_previous" in h for h in trainer.history)

    # a finished run resumed again asks nothing; the exported model reloads with ElegantTrainer
    again = build_trainer(out, LoggingOracle(str(log)))
    again.train()
    assert len(_read_log(log)) == 32 and len(again.feedback) == 32
    from hf_control_ft import ElegantTrainer
    from hf_control_ft.testing import ddpm, make_mlp_denoiser

    trainer.save_pretrained(str(tmp_path / "export"))
    loaded = ElegantTrainer.from_pretrained(str(tmp_path / "export"), make_mlp_denoiser(lora=False, hidden=16), ddpm(),
                                            report_to=None)
    a = trainer.sample(6, torch.Generator().manual_seed(4))
    b = loaded.sample(6, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, trainer.sample(6, torch.Generator().manual_seed(4), controlled=False))


def test_combined_initial_noise_and_reference_chain(tmp_path):
    sys.path.insert(0, HERE)
    from seiko_child import LoggingOracle, build_trainer

    tr = build_trainer(tmp_path / "run", LoggingOracle(str(tmp_path / "log")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tr.initial_noise.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    tr.previous_noise.load_state_dict(tr.initial_noise.state_dict())
    y, kl0, klp = tr.initial_noise(6, generator=torch.Generator().manual_seed(1), reference=tr.previous_noise)
    y_ref, kl_ref = tr.initial_noise(6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(kl0, kl_ref)
    assert (kl0 > 0).all() and torch.equal(klp, torch.zeros(6))  # same SDE as the previous round: no KL
    with torch.no_grad():
        for p in tr.previous_noise.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    _, _, klp = tr.initial_noise(6, generator=torch.Generator().manual_seed(1), reference=tr.previous_noise)
    assert (klp > 0).all()
    # previous adapter = pretrained (fresh zero LoRA): the mixture chain is the pretrained chain, no running cost
    x_T = torch.randn(5, 2, generator=g)
    x0, cost = tr.reference_rollout(x_T, torch.Generator().manual_seed(2))
    torch.testing.assert_close(x0, tr.sampler.sample(x_T, torch.Generator().manual_seed(2), controlled=False))
    assert torch.equal(cost, torch.zeros(5))


def test_push_to_hub_through_a_local_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    sys.path.insert(0, HERE)
    from hub_server import HubServer
    from seiko_child import LoggingOracle, build_trainer

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    tr = build_trainer(tmp_path / "run", LoggingOracle(str(tmp_path / "log")))
    with HubServer() as hub:
        commit = tr.push_to_hub("me/tiny-seiko", token="hf_test_token_456", endpoint=hub.url)
        repo = hub.repos["me/tiny-seiko"]
        assert commit.oid == repo.sha and len(repo.commits) == 1
        assert {"seiko_config.json", "pytorch_lora_weights.safetensors", "elegant_config.json",
                "initial_noise/model.safetensors", "README.md"} <= set(repo.files)
        assert json.loads(repo.files["seiko_config.json"])["optimism"] == "ucb"
