"""``--reward pickscore:1.0,clipscore:0.5``: a weighted mix of rewards from one flag, each term checked, named in
errors and logged on its own (``train/reward/<term>``)."""

import pytest
import torch

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.core.control import lora_parameters
from hf_control_ft.rewards.image_rewards import BrightnessReward, SaturationReward
from hf_control_ft.rewards.registry import RewardSpecError, check_spec, load_reward, mix_terms
from hf_control_ft.scripts import run_elegant
from hf_control_ft.testing import tiny_sd_pipeline


@pytest.mark.parametrize("spec, terms", [
    ("pickscore", None),
    ("rewards.py:sharpness", None),  # file:function is one term, not a weight
    ("pickscore:1.0,clipscore:0.5", [("pickscore", 1.0), ("clipscore", 0.5)]),
    ("brightness, saturation:-0.5", [("brightness", 1.0), ("saturation", -0.5)]),
    ("rewards.py:sharpness:0.2,aesthetic:1", [("rewards.py:sharpness", 0.2), ("aesthetic", 1.0)]),
    ("brightness:2", [("brightness", 2.0)]),
])
def test_mix_terms(spec, terms):
    assert mix_terms(spec) == terms


@pytest.mark.parametrize("spec, message", [
    ("brightness:1,brightness:2", "a term appears twice"),
    ("brightness:1,,saturation", "an empty term"),
    ("brightness:1,nope:0.5", "'nope' is neither a built-in reward"),
])
def test_a_bad_mix_is_one_line_naming_the_term(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        check_spec(spec)


def test_two_model_rewards_cannot_share_one_model_override():
    with pytest.raises(RewardSpecError, match="--reward_model_name_or_path .* 2 model rewards"):
        load_reward("pickscore:1,clipscore:1", model_name_or_path="some/clip")  # refused before any download


def test_the_mix_is_the_weighted_sum_and_each_term_is_logged():
    mix = load_reward("brightness:1.0,saturation:0.5")
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = BrightnessReward()(images) + 0.5 * SaturationReward()(images)
    assert torch.allclose(mix(images), expected)
    terms = mix.pop_term_means()
    assert terms == pytest.approx({"brightness": BrightnessReward()(images).mean().item(),
                                   "saturation": SaturationReward()(images).mean().item()})
    assert mix.pop_term_means() == {}

    cfg = ElegantConfig(alpha=1.0, num_inference_steps=2, learn_initial_noise=False, batch_size=2, report_to=None,
                        lora_rank=2)
    trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), load_reward("brightness:1.0,saturation:0.5"), cfg,
                                           prompts=["a cat", "a red car"])
    params = lora_parameters(trainer.model)
    metrics = trainer.drift_step(torch.optim.AdamW(params, lr=1e-3), params)
    assert set(metrics) >= {"train/reward/brightness", "train/reward/saturation"}
    assert metrics["train/reward"] == pytest.approx(
        metrics["train/reward/brightness"] + 0.5 * metrics["train/reward/saturation"], rel=1e-5)


def test_a_black_box_term_of_a_mix_is_named_before_any_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / "score.py").write_text("import torch\n\ndef score(images, prompts):\n"
                                       "    return torch.tensor([float(i.mean()) for i in images])\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_elegant(["--pretrained_model_name_or_path", "no-such-model", "--prompts", "a cat", "--report_to", "none",
                     "--output_dir", "out", "--reward", "brightness:1,score.py:score:0.5", "--model_family", "none"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "score.py:score" in err and "is not differentiable" in err
    assert "no-such-model" not in err
