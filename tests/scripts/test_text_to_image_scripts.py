"""The text-to-image scripts as a user runs them: ``accelerate launch examples/text_to_image/train_*.py`` on a tiny
pipeline saved to disk, a reward / oracle from a user's file, every flag form, one-line errors before any model
loads, resume, cards, TensorBoard validation images and a stock ``load_lora_weights`` on the result."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_control_ft import ElegantConfig, ElegantTrainer, SeikoConfig
from hf_control_ft.scripts import run_elegant
from hf_control_ft.scripts import text_to_image as t2i
from hf_control_ft.testing import tiny_sd_pipeline, tiny_unet_output

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ELEGANT = os.path.join(ROOT, "examples", "text_to_image", "train_elegant.py")
SEIKO = os.path.join(ROOT, "examples", "text_to_image", "train_seiko.py")
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
TINY = ["--num_inference_steps=3", "--batch_size", "2", "--value_num_rollouts", "4", "--value_train_steps", "2",
        "--noise_train_steps", "2", "--noise_batch_size", "8", "--num_validation_images", "2",
        # the tiny pipelines are detected as their families: these replace the family presets' real-scale values
        "--resolution", "16", "--gradient_accumulation_steps", "1", "--rollout_batch_size", "4", "--lora_rank", "8",
        "--learning_rate", "1e-3", "--checkpointing_steps", "0"]


def env(**extra):
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
             **extra)
    e.pop("RANK", None)
    return e


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t2i")
    tiny_sd_pipeline().save_pretrained(d / "tiny-sd")
    (d / "prompts.txt").write_text("a red cat\nthe blue sea\n")
    (d / "my_reward.py").write_text(
        "def redness(images, prompts):\n"
        "    assert len(prompts) == images.shape[0]\n"
        "    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))\n")
    (d / "my_oracle.py").write_text("def score(images, prompts):\n    return (10 * images[:, 0].mean(dim=(1, 2))).tolist()\n")
    return d


def launch(script, workdir, *flags, processes=1, extra_env=None, precision="no"):
    cmd = [*ACCELERATE, "--num_processes", str(processes), "--mixed_precision", precision]
    if processes > 1:
        cmd += ["--multi_gpu"]
    cmd += [script, "--pretrained_model_name_or_path", "tiny-sd", *flags]
    return subprocess.run(cmd, cwd=workdir, env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=400)


def tensorboard_image_steps(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for root, _, files in os.walk(logdir):
        for name in files:
            if name.startswith("events.out.tfevents"):
                acc = EventAccumulator(os.path.join(root, name), size_guidance={"images": 0})
                acc.Reload()
                for tag in acc.Tags()["images"]:
                    steps += [(tag, e.step) for e in acc.Images(tag)]
    return steps


@pytest.mark.slow
def test_elegant_script_trains_validates_resumes_and_saves_for_stock_diffusers(workdir):
    out = workdir / "elegant"
    flags = ["--prompts_file", "prompts.txt", "--reward", "my_reward.py:redness", *TINY, "--validation_steps", "2",
             "--checkpointing_steps", "2", "--output_dir", "elegant", "--guidance_scale=3.0",
             "--negative_prompt", "blurry", "--alpha", "0.5", "--eta=0.8", "--base_model_id", "someone/tiny-sd"]
    done = launch(ELEGANT, workdir, *flags, "--train_steps", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "network sample evaluations: stage 1 24" in done.stderr  # announced before training
    names = set(os.listdir(out))
    assert {"pytorch_lora_weights.safetensors", "initial_noise", "README.md", "sample_grid.png", "metrics.json",
            "validation", "logs", "checkpoint-2", "checkpoint-4", "stable_diffusion.json"} <= names
    assert sorted(os.listdir(out / "validation")) == ["step-000002.png", "step-000004.png"]
    card = (out / "README.md").read_text()
    for text in ("base_model: someone/tiny-sd", "| reward | redness |", '"a red cat", "the blue sea"',
                 '| negative prompt | "blurry" |', "| alpha (reward units per nat) | 0.5 |",
                 "| eta (DDIM stochasticity) | 0.8 |", "| sampling steps | 3 |", "| classifier-free guidance scale | 3.0 |",
                 "![samples](sample_grid.png)", "validation reward (mean of 2 images)",
                 "DDIMScheduler.from_config", "eta=0.8, num_inference_steps=3", "guidance_scale=3.0"):
        assert text in card, text
    assert str(workdir) not in card  # no absolute local path in a card
    # validation images in TensorBoard, at strictly increasing tracker steps after stages 1-2 (offset N + 1 = 3)
    steps = tensorboard_image_steps(out / "logs")
    assert [s for tag, s in steps if tag.startswith("validation")] == [3 + 2, 3 + 4]

    # resume from checkpoint-4 with more steps: stages 1-2 not repeated, the drift continues
    done = launch(ELEGANT, workdir, *flags, "--train_steps", "6", "--resume_from_checkpoint", "checkpoint-4")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"].endswith("checkpoint-4") and "value/loss" not in metrics["train"]
    assert "step-000006.png" in os.listdir(out / "validation")

    # a second fresh run on the same directory is refused in one line, before any model is loaded
    done = launch(ELEGANT, workdir, *flags, "--train_steps", "6")
    assert done.returncode != 0 and "error: --output_dir 'elegant' already holds a run" in done.stderr
    assert "Loading pipeline components" not in done.stderr

    # stock diffusers loads the adapter and reproduces the trained UNet exactly
    from diffusers import DiffusionPipeline

    stock = DiffusionPipeline.from_pretrained(workdir / "tiny-sd")
    base = tiny_unet_output(stock.unet)
    stock.load_lora_weights(str(out))
    trained = ElegantTrainer.from_pretrained(str(out), pipeline=DiffusionPipeline.from_pretrained(workdir / "tiny-sd"),
                                             report_to=None)
    assert torch.equal(tiny_unet_output(stock.unet), tiny_unet_output(trained.process.lora_model))
    assert not torch.allclose(base, tiny_unet_output(stock.unet), atol=1e-6)


@pytest.mark.slow
def test_seiko_script_runs_rounds_with_an_oracle_file_and_names_them_on_the_card(workdir):
    flags = ["--prompts", "a red cat", "the sea", "--oracle", "my_oracle.py:score", *TINY, "--num_rounds", "2",
             "--queries_per_round", "4", "--reward_train_steps", "5", "--train_steps", "2", "--validation_steps", "1",
             "--output_dir", "seiko", "--beta=0.5", "--optimism", "ucb", "--feature_model_name_or_path", "pixels"]
    done = launch(SEIKO, workdir, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    out = workdir / "seiko"
    assert {"pytorch_lora_weights.safetensors", "README.md", "feedback", "seiko_config.json"} <= set(os.listdir(out))
    assert sorted(os.listdir(out / "validation")) == ["round-001.png", "round-002.png"]
    card = (out / "README.md").read_text()
    for text in ("## SEIKO", "| oracle | score |", "| rounds | 2 |", "| queries per round | 4 |",
                 "| total oracle queries | 8 |", "| optimism | ucb |", "| beta (KL to the previous round) | 0.5 |"):
        assert text in card, text
    from hf_control_ft import load_feedback

    data = load_feedback(str(out / "feedback"))
    assert len(data) == 8 and set(data["prompt"]) <= {"a red cat", "the sea"}
    # a restart on the finished directory asks the oracle nothing again
    done = launch(SEIKO, workdir, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(load_feedback(str(out / "feedback"))) == 8


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_elegant_script_on_two_cpu_processes_with_accelerates_mixed_precision(workdir, fsdp):
    out = "two-fsdp" if fsdp else "two"
    sharded = ["--fsdp", "--validation_steps", "1"] if fsdp else ["--validation_steps", "0"]
    done = launch(ELEGANT, workdir, "--prompts_file", "prompts.txt", "--reward", "my_reward.py:redness", *TINY,
                  "--train_steps", "2", "--output_dir", out, *sharded, processes=2,
                  extra_env={"ACCELERATE_USE_CPU": "1"}, precision="bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    # accelerate's own --mixed_precision is honoured (frozen VAE / text encoder in bf16) with the preset's exact KL
    options = json.loads((workdir / out / "stable_diffusion.json").read_text())
    assert (options["mixed_precision"], options["kl_precision"]) == ("bf16", "delta")
    assert "drift 144 forward" in done.stderr  # 2 processes x batch 2 counted in the announced cost
    assert {"pytorch_lora_weights.safetensors", "README.md"} <= set(os.listdir(workdir / out))
    # --fsdp: the UNet sharded over both processes, validation images sampled by both at every step
    assert ("sharded over 2 processes" in done.stderr) == fsdp
    expected = ["step-000001.png", "step-000002.png"] if fsdp else ["step-000002.png"]
    assert sorted(os.listdir(workdir / out / "validation")) == expected


# ----------------------------------------------------------------------------- in-process: fast checks
@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(t2i, "load_pipeline", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--reward", "nonsense"], "neither a built-in reward"),
    (["--reward", "my_reward.py:bluenes"], "has no 'bluenes' (callables there: ['redness'])"),
    (["--reward", "missing.py:f"], "reward file 'missing.py' (from 'missing.py:f') does not exist"),
    (["--reward", "my_reward.py:redness", "--prompts_file", "nope.txt"], "--prompts_file 'nope.txt' cannot be read"),
    (["--reward", "my_reward.py:redness", "--alpah", "1"], "unknown flag --alpah (did you mean --alpha?)"),
    (["--reward", "my_reward.py:redness", "--eta", "0"], "error: --eta: must be in (0, 1]"),
    (["--reward", "my_reward.py:redness", "--resolution", "20"], "resolution: must be a positive multiple of 8"),
    (["--reward", "aesthetic"], "needs --aesthetic_head"),
    (["--reward", "my_reward.py:redness", "--tracker_init_kwargs", "{bad"], "tracker_init_kwargs: must be a JSON"),
    (["--reward", "my_reward.py:redness", "--report_to", "tensorboard,clearml"], "--report_to clearml: not installed"),
    # a token is never echoed, whatever went wrong around it
    (["--reward", "my_reward.py:redness", "--hub_token", "hf_SeCrEt42", "push"], "--hub_token takes one value, got"),
    (["--reward", "my_reward.py:redness", "--hub_token=hf_SeCrEt42", "--eta", "0"], "--eta"),
])
def test_bad_flags_exit_with_one_line_before_loading_a_model(workdir, monkeypatch, capsys, no_model_loading,
                                                             flags, message):
    monkeypatch.chdir(workdir)
    argv = ["--pretrained_model_name_or_path", "tiny-sd", "--output_dir", "never", *flags]
    if "--prompts_file" not in flags:
        argv += ["--prompts_file", "prompts.txt"]
    with pytest.raises(SystemExit) as exit_info:
        run_elegant(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "SeCrEt42" not in err
    assert not os.path.exists(workdir / "never")


def test_help_lists_every_field_with_its_help_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_elegant(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    import dataclasses

    from hf_control_ft.scripts import ElegantScriptArguments

    for cls in (ElegantConfig, ElegantScriptArguments):
        for f in dataclasses.fields(cls):
            also = "".join(f", --{a}" for a in f.metadata.get("aliases", ()))  # diffusers' names beside it
            assert f"--{f.name}{also}  (" in text, f.name
            assert f.metadata["help"].split()[0] in text, f.name
    assert "--pretrained_model_name_or_path" in text and "--hub_token" in text


def test_config_file_with_flag_overrides_and_switches(workdir, tmp_path):
    from hf_control_ft.scripts import ElegantScriptArguments, SeikoScriptArguments, parse_script_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"pretrained_model_name_or_path: {workdir / 'tiny-sd'}\nprompts_file: {workdir / 'prompts.txt'}\n"
                   "reward: brightness\nalpha: 0.3\ntrain_steps: 7\nlearning_rate: 1e-4\nguidance_scale: 5\n")
    args, config = parse_script_args(ElegantScriptArguments, ElegantConfig,
                                     ["--config", str(cfg), "--alpha=0.2", "--no_learn_initial_noise",
                                      "--push_to_hub", "--output_dir", str(tmp_path / "o"), "--hub_token", "hf_SECRET"])
    assert (config.alpha, config.train_steps, config.learning_rate, config.learn_initial_noise) == (0.2, 7, 1e-4, False)
    assert (args.reward, args.guidance_scale, args.push_to_hub, args.hub_model_id) == ("brightness", 5, True, "o")
    assert config.logging_dir == os.path.join(str(tmp_path / "o"), "logs")
    assert "hf_SECRET" not in repr(args)  # the token never shows in a repr (logs, errors)
    args, config = parse_script_args(SeikoScriptArguments, SeikoConfig,
                                     [f"--pretrained_model_name_or_path={workdir / 'tiny-sd'}", "--prompts", "a cat",
                                      "--oracle", "brightness", "--queries_per_round", "3", "5", "--num_rounds=2"])
    assert config.queries_per_round == [3, 5] and args.prompts == ["a cat"]
    args, _ = parse_script_args(SeikoScriptArguments, SeikoConfig,
                                [f"--pretrained_model_name_or_path={workdir / 'tiny-sd'}", "--prompts", "a cat",
                                 "--oracle", "human", "--raters", "alice", "bob", "--rating_scale", "0", "1", "0.25",
                                 "--rating_mode", "pairwise", "--ratings_per_query", "3"])
    assert (args.raters, args.rating_scale, args.rating_mode, args.ratings_per_query) == (
        ["alice", "bob"], [0.0, 1.0, 0.25], "pairwise", 3)
    with pytest.raises(SystemExit):  # people as the oracle need someone to log in
        parse_script_args(SeikoScriptArguments, SeikoConfig, [f"--pretrained_model_name_or_path={workdir / 'tiny-sd'}",
                                                              "--prompts", "a cat", "--oracle", "human"])


# ----------------------------------------------------------------------------- the CLI on a script's save and the Hub
def test_cli_samples_and_evaluates_a_text_to_image_save_locally_and_from_the_hub(workdir, tmp_path, monkeypatch,
                                                                                 capsys):
    import huggingface_hub.constants as hub_constants
    from hub_server import HubServer
    from PIL import Image

    from hf_control_ft.cli import main as cli_main
    from hf_control_ft.serialization.saved import push_directory

    monkeypatch.chdir(workdir)
    out = str(tmp_path / "run")
    assert run_elegant(["--pretrained_model_name_or_path", "tiny-sd", "--prompts_file", "prompts.txt", "--reward",
                        "my_reward.py:redness", *TINY, "--train_steps", "2", "--output_dir", out, "--report_to",
                        "none", "--validation_steps", "0", "--base_model_id", "tiny-sd"]) == 0
    grid = str(tmp_path / "grid.png")
    assert cli_main(["sample", out, "--prompt", "a red cat", "--num_samples", "4", "--output", grid]) == 0
    assert Image.open(grid).size == (2 * 17 + 1, 2 * 17 + 1)  # 2x2 grid of 16x16 images
    from hf_control_ft.rewards import AestheticHead
    from hf_control_ft.testing import tiny_clip_model

    clip, tokenizer = tiny_clip_model()
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    report = str(tmp_path / "eval.json")
    diversity = ["--diversity_model", str(tmp_path / "clip")]  # CLIP-space diversity within each prompt
    assert cli_main(["evaluate", out, "--reward", "my_reward.py:redness", "--prompt", "a red cat", "the blue sea",
                     "--num_samples", "4", "--output", report, *diversity]) == 0
    local = json.load(open(report))
    assert local["num_samples"] == 4 and local["pretrained"]["reward_mean"] != local["fine_tuned"]["reward_mean"]
    for model in ("pretrained", "fine_tuned"):
        assert 0 < local[model]["diversity_clip_cosine"] < 2 and local[model]["diversity_pairwise_distance"] > 0
    (tmp_path / "heldout.txt").write_text("a green bird\nthe red door\n")  # held-out prompts, from a file
    assert cli_main(["evaluate", out, "--reward", "my_reward.py:redness", "--prompts_file",
                     str(tmp_path / "heldout.txt"), "--num_samples", "4", "--output", str(tmp_path / "held.json"),
                     "--diversity_model", "none"]) == 0
    held = json.load(open(tmp_path / "held.json"))
    assert held["prompts"].endswith("heldout.txt") and held["fine_tuned"]["diversity_clip_cosine"] is None
    # evaluate --reward aesthetic takes --aesthetic_head (it used to ask for the flag, then reject it)
    torch.save(AestheticHead(embed_dim=16).state_dict(), tmp_path / "head.pth")
    assert cli_main(["evaluate", out, "--reward", "aesthetic", "--reward_model_name_or_path", str(tmp_path / "clip"),
                     "--aesthetic_head", str(tmp_path / "head.pth"), "--prompt", "a red cat", "--num_samples", "2",
                     "--output", str(tmp_path / "aesthetic.json"), "--diversity_model", "none"]) == 0
    assert json.load(open(tmp_path / "aesthetic.json"))["reward"] == "aesthetic"
    with pytest.raises(SystemExit):
        cli_main(["evaluate", out, "--reward", "aesthetic", "--prompt", "a red cat", "--num_samples", "2"])
    assert "needs --aesthetic_head" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["sample", out, "--num_samples", "2"])  # a text-to-image control needs --prompt
    assert "pass --prompt" in capsys.readouterr().err

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with HubServer() as hub:
        push_directory(out, "me/tiny-t2i", token="hf_x", endpoint=hub.url)
        report2 = str(tmp_path / "eval-hub.json")
        assert cli_main(["evaluate", "me/tiny-t2i", "--reward", "my_reward.py:redness", "--prompt", "a red cat",
                         "the blue sea", "--num_samples", "4", "--output", report2, "--endpoint", hub.url,
                         *diversity]) == 0
    assert json.load(open(report2)) == local  # the same control, the same seed: the same numbers


def test_elegant_script_trains_every_family_saved_to_disk(workdir, tmp_path, monkeypatch):
    """SDXL, SD3 (saved without T5) and FLUX through the same script: the class comes from the checkpoint."""
    from diffusers import DiffusionPipeline

    from hf_control_ft.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

    monkeypatch.chdir(workdir)
    for name, make, extra in (("sdxl", tiny_sdxl_pipeline, []),
                              ("sd3", tiny_sd3_pipeline, ["--max_sequence_length", "16"]),
                              ("flux", tiny_flux_pipeline, ["--max_sequence_length", "8", "--resolution", "16"])):
        make().save_pretrained(tmp_path / f"tiny-{name}")
        out = str(tmp_path / f"out-{name}")
        assert run_elegant(["--pretrained_model_name_or_path", str(tmp_path / f"tiny-{name}"), "--prompts_file",
                            "prompts.txt", "--reward", "my_reward.py:redness", *TINY, "--train_steps", "1",
                            "--output_dir", out, "--report_to", "none", "--validation_steps", "0", "--eta", "0.5",
                            *extra]) == 0
        card = open(os.path.join(out, "README.md")).read()
        family = {"sdxl": "stable-diffusion-xl", "sd3": "stable-diffusion-3", "flux": "flux"}[name]
        assert f"| model family | {family} |" in card
        assert str(tmp_path) not in card
        stock = DiffusionPipeline.from_pretrained(tmp_path / f"tiny-{name}",
                                                  **({"text_encoder_3": None, "tokenizer_3": None}
                                                     if name == "sd3" else {}))
        stock.load_lora_weights(out)  # the family's stock loader
        assert os.path.isfile(os.path.join(out, "validation", "step-000001.png"))


@pytest.mark.slow
def test_elegant_script_trains_the_newer_families_saved_to_disk(workdir, tmp_path, monkeypatch):
    """Qwen-Image, FLUX.2 [klein], Z-Image and Wan (a video reward from a user file, --num_frames / --fps, an animated
    validation grid) through the same script, each detected from its checkpoint and reloaded by its stock loader."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    from hf_control_ft.testing.families import (tiny_flux2_klein_pipeline, tiny_qwen_image_pipeline,
                                                tiny_wan_pipeline, tiny_z_image_pipeline)

    monkeypatch.chdir(workdir)
    (workdir / "video_reward.py").write_text(
        "def redness(videos, prompts):\n"
        "    assert videos.dim() == 5 and len(prompts) == videos.shape[0]\n"
        "    return (videos[:, :, 0] - videos[:, :, 1:].mean(2)).mean(dim=(1, 2, 3))\n")
    cases = (("qwen-image", tiny_qwen_image_pipeline, "my_reward.py:redness", ["--resolution", "32"]),
             ("flux2-klein", tiny_flux2_klein_pipeline, "my_reward.py:redness", ["--max_sequence_length", "32"]),
             ("z-image", tiny_z_image_pipeline, "my_reward.py:redness", ["--max_sequence_length", "64"]),
             ("wan", tiny_wan_pipeline, "video_reward.py:redness",
              ["--height", "32", "--width", "32", "--num_frames", "5", "--fps", "8", "--max_sequence_length", "16"]))
    for family, make, reward, extra in cases:
        make().save_pretrained(tmp_path / f"tiny-{family}")
        out = str(tmp_path / f"out-{family}")
        assert run_elegant(["--pretrained_model_name_or_path", str(tmp_path / f"tiny-{family}"), "--prompts_file",
                            "prompts.txt", "--reward", reward, *TINY, "--train_steps", "1", "--output_dir", out,
                            "--report_to", "none", "--validation_steps", "0", "--eta", "0.5", *extra]) == 0
        card = open(os.path.join(out, "README.md")).read()
        assert f"| model family | {family} |" in card and str(tmp_path) not in card
        stock = DiffusionPipeline.from_pretrained(tmp_path / f"tiny-{family}")
        stock.load_lora_weights(out)
        grid = Image.open(os.path.join(out, "validation", "step-000001.png"))
        assert getattr(grid, "n_frames", 1) == (5 if family == "wan" else 1)
        if family == "wan":
            assert Image.open(os.path.join(out, "sample_grid.png")).n_frames == 5
            assert json.load(open(os.path.join(out, "stable_diffusion.json")))["fps"] == 8
            from hf_control_ft.cli import main as cli_main

            base = ["--base_model", str(tmp_path / "tiny-wan"), "--prompt", "a red cat", "--num_samples", "2"]
            assert cli_main(["sample", out, *base, "--output", str(tmp_path / "videos.gif")]) == 0
            gif = Image.open(tmp_path / "videos.gif")
            assert gif.n_frames == 5 and 120 <= gif.info["duration"] <= 130  # 8 fps (GIF: centiseconds)
            assert cli_main(["evaluate", out, *base, "--reward", "video_reward.py:redness", "--output",
                             str(tmp_path / "wan.json"), "--diversity_model", "none"]) == 0
            assert set(json.load(open(tmp_path / "wan.json"))["fine_tuned"]) >= {"reward_mean",
                                                                                 "diversity_pairwise_distance"}


def test_prompts_from_a_local_dataset_with_its_own_column(workdir, tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(workdir)
    datasets.Dataset.from_dict({"caption": ["a red cat", "the sea", "a dog"]}).save_to_disk(str(tmp_path / "ds"))
    out = str(tmp_path / "out")
    flags = ["--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", str(tmp_path / "ds"), "--reward",
             "my_reward.py:redness", *TINY, "--train_steps", "1", "--output_dir", out, "--report_to", "none",
             "--validation_steps", "0"]
    with pytest.raises(SystemExit):  # the default column 'prompt' is not there: one line naming the columns
        run_elegant(flags + ["--output_dir", str(tmp_path / "never")])
    assert run_elegant(flags + ["--prompt_column", "caption"]) == 0
    card = open(os.path.join(out, "README.md")).read()
    assert "| prompts | dataset `ds` (3 prompts) |" in card and str(tmp_path) not in card
    assert "validation reward" in card


def test_seiko_reward_heads_on_clip_image_embeddings(workdir, tmp_path, monkeypatch):
    """--feature_model_name_or_path: the reward ensemble and the UCB bonus work on a (tiny, random) CLIP's
    normalised image embeddings instead of pooled pixels."""
    from hf_control_ft.rewards import CLIPImageFeatures
    from hf_control_ft.scripts import run_seiko
    from hf_control_ft.testing import tiny_clip_model

    model, tokenizer = tiny_clip_model()
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    features = CLIPImageFeatures.from_pretrained(str(tmp_path / "clip"))
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    f = features(x)
    f.sum().backward()
    assert f.shape == (3, 16) and torch.allclose(f.norm(dim=1), torch.ones(3)) and x.grad.abs().sum() > 0
    monkeypatch.chdir(workdir)
    out = str(tmp_path / "seiko")
    assert run_seiko(["--pretrained_model_name_or_path", "tiny-sd", "--prompts", "a red cat", "the sea",
                      "--oracle", "my_oracle.py:score", *TINY, "--num_rounds", "1", "--queries_per_round", "4",
                      "--reward_train_steps", "3", "--train_steps", "1", "--output_dir", out, "--report_to", "none",
                      "--feature_model_name_or_path", str(tmp_path / "clip")]) == 0
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
