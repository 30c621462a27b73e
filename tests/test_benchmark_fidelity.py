"""benchmarks/digits_fidelity.py (fidelity to the exact tilted law against the peers), benchmarks/tilted_levers.py
(optimiser levers) and the held-out exact cases."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _point(kl, frechet, nfe=100):
    fidelity = {"1": {"frechet": frechet, "mmd2": frechet / 10, "c2st": 0.5 + frechet / 100, "class_tv": 0.1}}
    return {"kl": kl, "reward": -1.0, "genuine_reward": -1.0, "genuine_target_rate": 0.9, "within_class_diversity": 3.0,
            "nfe": nfe, "diverged": False, "fidelity": fidelity}


def test_summary_compares_peers_at_the_point_closest_to_elegants_kl():
    import digits_fidelity

    refs = {1.0: {"floor": {"frechet": 2.0}, "pretrained": {"frechet": 50.0}, "acceptance_rate": 0.1}}
    records = [{"method": "elegant", "alpha": 1.0, "seed": s, "final": _point(kl, f), "curve": [_point(kl, f)]}
               for s, (kl, f) in enumerate([(3.0, 3.0), (5.0, 5.0)])]  # mean KL 4, mean Fréchet 4
    for s in (0, 1):
        curve = [_point(0.5, 40.0), _point(3.5 + s, 10.0 + s), _point(9.0, 1.0), _point(400.0, 30.0)]
        records.append({"method": "grpo", "alpha": 1.0, "seed": s, "final": curve[-1], "curve": curve})
    out = digits_fidelity.summarise(records, [1.0], refs)["1"]
    assert out["elegant"]["frechet"]["mean"] == pytest.approx(4.0)
    assert out["elegant"]["kl"]["mean"] == pytest.approx(4.0)
    # the objective's gap to alpha log Z: log Z - E[r] / alpha + KL
    assert out["elegant"]["path_kl_to_target"]["mean"] == pytest.approx(math.log(0.1) + 1.0 + 4.0, abs=1e-4)
    # seed 0: |3.5 - 4| < |9 - 4|; seed 1: 4.5 is closest
    assert out["grpo"]["matched_kl"]["kl"]["mean"] == pytest.approx(4.0)
    assert out["grpo"]["matched_kl"]["frechet"]["mean"] == pytest.approx(10.5)
    assert out["grpo"]["final"]["frechet"]["mean"] == pytest.approx(30.0)
    assert "goal" not in out  # not every peer ran


def test_digits_fidelity_end_to_end_on_a_tiny_cache(tmp_path, capsys):
    """Tiny cache, 3 steps: exact references per alpha with floors, every evaluation point of every method scored
    against every alpha, the peers at ELEGANT's KL, the plot."""
    import digits_fidelity

    from hf_control_ft.tasks import digits

    cache = str(tmp_path / "cache")
    digits.load_or_pretrain_digits_model(cache, steps=30, progress=False)
    digits.load_or_train_classifiers(cache, epochs=3)
    digits_fidelity.main(["--quick", "--steps", "3", "--cache_dir", cache, "--eval_samples", "48", "--seeds", "0",
                          "--alphas", "1", "0.5", "--baseline_batch_size", "8", "--png", str(tmp_path / "f.png")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "digits_fidelity" and out["alphas"] == [1.0, 0.5]
    for key in ("1", "0.5"):
        ref = out["references"][key]
        assert 0 < ref["acceptance_rate"] <= 1
        assert 0 <= ref["floor"]["c2st"] <= 1 and ref["floor"]["frechet"] >= 0
    # a stronger tilt accepts fewer pretrained samples
    assert out["references"]["0.5"]["acceptance_rate"] < out["references"]["1"]["acceptance_rate"]
    methods = {(r["method"], r["alpha"]) for r in out["records"]}
    assert methods == {("elegant", 1.0), ("elegant", 0.5), ("grpo", 1.0), ("ddpo", 1.0), ("reward_backprop", 1.0)}
    for r in out["records"]:
        for p in r["curve"]:
            assert set(p["fidelity"]) == {"1", "0.5"} and p["fidelity"]["1"]["frechet"] >= 0
        if r["method"] != "elegant":
            assert r["final"]["nfe"] >= out["nfe_budget"]
    s = out["summary"]["1"]
    assert set(s["goal"]) == {"elegant_frechet_over_floor", "below_every_peer_at_matched_kl"}
    for m in ("grpo", "ddpo", "reward_backprop"):
        assert s[m]["matched_kl"]["frechet"]["n"] == 1
    assert os.path.getsize(tmp_path / "f.png") > 0
    assert s["elegant"]["path_kl_to_target"]["n"] == 1
    # an earlier output is summarised again without running anything
    (tmp_path / "out.json").write_text(json.dumps(out))
    digits_fidelity.main(["--from_json", str(tmp_path / "out.json")])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["summary"] == out["summary"]


def test_lever_settings_parse_and_refuse_more_network_evaluations():
    import tilted_levers

    name, overrides = tilted_levers.parse_setting("cos:learning_rate=3e-3,lr_scheduler=cosine,lr_warmup_steps=40")
    assert name == "cos" and overrides == {"learning_rate": 3e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 40}
    args = tilted_levers._Args(overrides, 8192)
    assert (args.lr, args.lr_scheduler, args.lr_warmup_steps, args.train_steps) == (3e-3, "cosine", 40, 400)
    with pytest.raises(SystemExit, match="train_steps changes the network evaluations"):
        tilted_levers.parse_setting("long:train_steps=800")
    with pytest.raises(SystemExit, match="unknown lever 'lora_rank'"):
        tilted_levers._Args({"lora_rank": 4}, 8192)


@pytest.mark.parametrize("name", ["bump_2d", "flow_bump_3d"])
def test_held_out_cases_have_exact_targets_away_from_the_pretrained_law(name):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tilted_cases import HELD_OUT, build_case

    assert name in HELD_OUT
    case = build_case(name, distill_steps=20, num_reference=50_000)
    w_pre, w_tgt = case["mixture"].weights.double(), case["target"].weights.double()
    assert float(w_tgt.sum()) == pytest.approx(1.0)
    assert float((w_pre - w_tgt).abs().sum() / 2) > 0.1  # the tilt moves at least 10% of the mass
    if name == "flow_bump_3d":
        assert isinstance(case["scheduler"], FlowMatchEulerDiscreteScheduler)
        assert case["scheduler"].config.shift == 3.0
    x = case["target"].sample(4000, torch.Generator().manual_seed(0))
    assert case["target"].mode_weight_tv(x) < 0.03  # exact samples score near 0


def test_pathwise_mixing_lever_switches_every_nth_iteration_and_is_undone(monkeypatch):
    import types

    import tilted_levers

    from hf_control_ft import ElegantTrainer

    seen = []
    monkeypatch.setattr(ElegantTrainer, "drift_step",
                        lambda self, opt, params: seen.append(self.config.drift_objective))
    recorder = ElegantTrainer.drift_step
    plain = tilted_levers.mix_in_pathwise(3)
    assert plain is recorder
    fake = types.SimpleNamespace(config=types.SimpleNamespace(drift_objective="value_guided"), global_step=0)
    for step in range(6):
        fake.global_step = step
        ElegantTrainer.drift_step(fake, None, None)
    assert seen == ["value_guided", "value_guided", "pathwise"] * 2
    assert fake.config.drift_objective == "value_guided"
    ElegantTrainer.drift_step = plain


def test_levers_start_from_the_floor_and_measure_the_exact_start(capsys):
    """Quick sizes: a run started from the regression onto the exact target reports that start's TV, and every
    run reports the trained drift from the exact optimal start law (importance-resampled pretrained paths)."""
    import tilted_levers

    tilted_levers.main(["--quick", "--rows", "linear_2d:0.2", "--setting", "from_floor:init_from_floor=1",
                        "--eval_samples", "512"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = out["settings"]["from_floor"]["rows"]["linear_2d:0.2"]
    assert row["drift_objective"] == "value_guided" and row["seeds"] == [0]
    for key in ("tv", "start_tv", "exact_start_tv"):
        assert len(row[key]) == 1 and 0 <= row[key][0] <= 1
    assert sum(row["mode_weights"]) == pytest.approx(1.0, abs=1e-3)
