"""ELEGANT's reward is tried on a tiny batch before the diffusion model loads: a black-box reward is sent to SEIKO
and a malformed one is named, in one line, without waiting for a model."""

import pytest

from hf_control_ft.scripts import run_elegant

ARGS = ["--pretrained_model_name_or_path", "no-such-model", "--prompts", "a cat", "--report_to", "none",
        "--output_dir", "out", "--model_family", "none"]  # no model_index.json to read: the family given


@pytest.mark.parametrize("body, expected", [
    ("return torch.tensor([float(i.mean()) for i in images])",  # a black box: no gradient
     "is not differentiable (its output has no gradient with respect to the images): ELEGANT backpropagates"),
    ("return images.mean(dim=(1, 2, 3))[:1]", "returned shape (1,); expected (2,)"),
    ("return [0.5, 0.5]", "returned list; expected a torch.Tensor"),
])
def test_a_reward_that_cannot_be_trained_on_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, body,
                                                                              expected):
    (tmp_path / "score.py").write_text(f"import torch\n\ndef score(images, prompts):\n    {body}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_elegant([*ARGS, "--reward", "score.py:score"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and expected in err and "no-such-model" not in err  # no model was loaded
    if "differentiable" in expected:
        assert "train_seiko.py --oracle score.py:score" in err


@pytest.mark.parametrize("argv, message", [
    ([], "error: --pretrained_model_name_or_path: is required"),  # a run without arguments asks for the model first
    (["--pretrained_model_name_or_path", "m"], "error: --prompts: give exactly one prompt source"),
    (["--pretrained_model_name_or_path", "m", "--prompts", "a", "--alpha", "-1"], "error: --alpha: must be a finite"),
])
def test_argument_errors_name_the_flag_the_user_typed(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run_elegant(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(message) and "Arguments." not in err and "Config." not in err
