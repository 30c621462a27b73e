"""The machinery of benchmarks/compare_finetuners.py and benchmarks/tilted_target.py: NFE counting, the baselines'
evaluation counts and parameter updates, and the exact-target suite's JSON."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from finetuner_baselines import NFECounter, policy_gradient_epoch, reward_backprop_iteration  # noqa: E402

from hf_control_ft import ControlledSampler  # noqa: E402
from hf_control_ft.core.control import lora_parameters  # noqa: E402
from hf_control_ft.core.scheduling import DiffusionSchedule  # noqa: E402
from hf_control_ft.testing import ddim, make_mlp_denoiser  # noqa: E402


def _setup(K=5):
    torch.manual_seed(0)
    model = make_mlp_denoiser()
    counter = NFECounter(model)
    schedule = DiffusionSchedule(ddim(), K, 1.0)
    sampler = ControlledSampler(model, schedule, gradient_checkpointing=False)
    opt = torch.optim.Adam(lora_parameters(model), lr=1e-2)
    return model, counter, sampler, opt


def _reward(x):
    return x[:, 0]


def test_nfe_counter_counts_forward_and_backward_rows():
    model, counter, sampler, _ = _setup()
    x = torch.randn(7, 2)
    with torch.no_grad():
        sampler.mean(x, 0)
    assert (counter.forward, counter.backward) == (7, 0)
    sampler.mean(x, 1).sum().backward()
    assert (counter.forward, counter.backward) == (14, 7)


@pytest.mark.parametrize("method", ["grpo", "ddpo"])
def test_policy_gradient_epoch_costs_what_the_published_form_costs_and_moves_the_adapter(method):
    model, counter, sampler, opt = _setup()
    S = sum(sampler.schedule.is_stochastic(k) for k in range(5))
    before = [p.detach().clone() for p in lora_parameters(model)]
    policy_gradient_epoch(sampler, opt, _reward, (2,), 16, torch.Generator().manual_seed(0), method, group_size=4)
    # sampling: 16 x 5 (its log-likelihoods come from the noises); training: 16 x S policy forwards + backwards,
    # plus the pretrained forward of the KL penalty for GRPO only
    forward = 16 * 5 + 16 * S + (16 * S if method == "grpo" else 0)
    assert (counter.forward, counter.backward) == (forward, 16 * S)
    assert any(not torch.equal(a, b) for a, b in zip(lora_parameters(model), before))


def test_old_log_likelihood_from_the_noise_equals_the_transition_density():
    """The ratio's denominator computed from the stored noise is the Gaussian log-likelihood of the sampled step."""
    from finetuner_baselines import _gaussian_logp

    model, _, sampler, _ = _setup()
    gen = torch.Generator().manual_seed(0)
    traj = sampler.rollout(torch.randn(6, 2, generator=gen), gen)
    k = 2
    with torch.no_grad():
        direct = _gaussian_logp(traj.states[k + 1], sampler.mean(traj.states[k], k), sampler.schedule.std[k].item())
    assert torch.allclose(direct, -(traj.noises[k] ** 2).mean(1) / 2, atol=1e-5)


def test_reward_backprop_iteration_backpropagates_the_last_steps_only():
    model, counter, sampler, opt = _setup()
    # the window holds the last random step and the two deterministic ones (the jump into t = 0, then to abar = 1)
    reward_backprop_iteration(sampler, opt, _reward, (2,), 8, torch.Generator().manual_seed(0), truncate=3)
    assert (counter.forward, counter.backward) == (8 * 5, 8 * 3)


def test_tilted_target_reports_seeds_intervals_and_the_exact_value_ablation(capsys):
    import tilted_target

    tilted_target.main(["--quick", "--case", "linear_2d", "--etas", "1.0", "--seeds", "0", "1", "--train_steps", "2",
                        "--skip_fixed_noise", "--skip_floor", "--exact_values", "--drift_objectives", "auto",
                        "--eval_samples", "512"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    setting = out["settings"]["eta=1.0"]
    assert out["target_weights"] == pytest.approx([0.1806, 0.4857, 0.3337], abs=1e-4)
    for key in ("elegant_auto", "elegant_exact_values"):
        block = setting[key]
        assert block["seeds"] == [0, 1] and len(block["runs"]) == 2
        tvs = [r["samples"]["tv"] for r in block["runs"]]
        assert block["tv_mean"] == pytest.approx(sum(tvs) / 2, abs=1e-4)
        assert block["tv_ci95"][0] <= block["tv_mean"] <= block["tv_ci95"][1]
    assert {r["drift_objective"] for r in setting["elegant_auto"]["runs"]} == {"value_guided"}
    assert 0 <= setting["pretrained"]["tv"] <= 1


def test_nfe_counter_does_not_count_evaluations_inside_pause():
    model, counter, sampler, _ = _setup()
    with counter.pause(), torch.no_grad():
        sampler.mean(torch.randn(5, 2), 0)
    assert counter.total == 0 and not counter.paused


def test_digits_comparison_scores_every_method_at_the_same_budget(tmp_path, capsys):
    """The digits task end to end (tiny cache, 3 steps): every method trains on the proxy, is scored by the
    genuine classifier with diversity and within-class diversity, and the baselines spend ELEGANT's NFE."""
    import compare_finetuners

    from hf_control_ft.tasks import digits

    cache = str(tmp_path / "cache")
    digits.load_or_pretrain_digits_model(cache, steps=30, progress=False)
    digits.load_or_train_classifiers(cache, epochs=3)
    compare_finetuners.main(["--task", "digits", "--quick", "--seeds", "0", "--steps", "3", "--cache_dir", cache,
                             "--eval_samples", "64", "--baseline_batch_size", "8", "--baseline_lr", "grpo=1e-2",
                             "--reach", "-100", "0", "--png", str(tmp_path / "curves.png")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the JSON is the last line (and alone)
    assert out["task"] == "digits" and out["primary"] == "genuine_reward" and out["steps"] == 3
    records = {r["method"]: r for r in out["records"]}
    assert set(records) == {"elegant", "grpo", "ddpo", "reward_backprop"}
    budget = out["nfe_budget"]
    assert budget == records["elegant"]["final"]["nfe"] > 0
    for name, rec in records.items():
        final = rec["final"]
        for key in ("reward", "genuine_reward", "diversity", "within_class_diversity", "kl"):
            assert key in final
        assert final["genuine_reward"] <= 0 and final["diversity"] > 0 and final["kl"] >= 0
        if name != "elegant":  # spent the budget, and at most one more epoch of 8 samples x 3 steps x 4
            assert budget <= final["nfe"] <= budget + 8 * 3 * 4
    assert records["grpo"]["lr"] == 1e-2 and records["ddpo"]["lr"] == records["elegant"]["lr"]
    summary = out["summary"]
    for name in records:
        assert summary[name]["reach_genuine_reward_-100"]["runs_reaching"] == 1  # every log-probability is > -100
        assert summary[name]["reach_genuine_reward_0"]["runs_reaching"] == 0  # and none is 0
    assert "at_elegant_kl" in summary["grpo"] and summary["elegant_vs_grpo"]["score"] == "genuine_reward"
    assert os.path.getsize(tmp_path / "curves.png") > 0
