"""The digits main job: data, classifiers, metrics, the accelerate-launched script, resume, 2 processes, CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from hf_control_ft.cli import main as cli_main
from hf_control_ft.serialization import checkpoints as checkpointing
from hf_control_ft.tasks import digits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "train_elegant.py")
sys.path.insert(0, os.path.join(ROOT, "examples"))
import train_elegant  # noqa: E402

# tiny settings: every run below takes seconds on 2 CPU cores
TINY = ["--num_inference_steps", "3", "--batch_size", "4", "--value_num_rollouts", "8", "--value_train_steps", "3",
        "--noise_train_steps", "3", "--noise_num_steps", "2", "--noise_batch_size", "8", "--aux_hidden", "8",
        "--num_eval_samples", "16", "--report_to", "none", "--log_every", "1", "--lora_rank", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("digits_cache"))
    digits.load_or_pretrain_digits_model(path, steps=30, progress=False)
    digits.load_or_train_classifiers(path, epochs=3)
    return path


def env():
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    return e


def test_digits_data_halves_and_classifiers(cache):
    images, labels = digits.load_digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1.0 and images.max() == 1.0
    a, b = digits.disjoint_halves(images.shape[0])
    assert len(set(a.tolist()) & set(b.tolist())) == 0 and len(a) + len(b) == 1797
    proxy, genuine = digits.load_or_train_classifiers(cache)
    assert proxy.kind == "mlp" and genuine.kind == "cnn"
    report = json.load(open(os.path.join(cache, "classifiers.json")))
    assert report["proxy_heldout_accuracy"] > 0.5 and report["genuine_heldout_accuracy"] > 0.5
    reward = digits.DigitReward(proxy, 3)
    x = images[:5].clone().requires_grad_(True)
    r = reward(x)
    assert r.shape == (5,) and (r <= 0).all()
    r.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="target_digit"):
        digits.DigitReward(proxy, 10)


def test_digits_metrics_numbers():
    x = torch.zeros(2, 1, 8, 8)
    x[1] = 0.5  # distance sqrt(64 * 0.25) = 4
    assert digits.mean_pairwise_distance(x) == pytest.approx(4.0)

    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class 3 for sample 0 and 7 for sample 1
            logits = torch.full((x.shape[0], 10), -10.0)
            logits[0, 3] = 10.0
            logits[1, 7] = 10.0
            return logits

    m = digits.digits_metrics(x, Fixed(), Fixed(), target_digit=3)
    assert m["genuine_target_rate"] == 0.5 and m["distinct_classes"] == 2
    assert m["genuine_class_histogram"][3] == 0.5 and m["genuine_class_histogram"][7] == 0.5
    assert m["class_entropy_nats"] == pytest.approx(torch.log(torch.tensor(2.0)).item())


@pytest.mark.slow
def test_train_script_writes_outputs_refuses_overwrite_and_cli_reads_them(cache, tmp_path):
    out = str(tmp_path / "run")
    argv = ["--config", os.path.join(ROOT, "examples", "configs", "digits_elegant.yaml"), "--cache_dir", cache,
            "--output_dir", out, "--train_steps", "2", "--checkpointing_steps", "1", *TINY]
    trainer = train_elegant.run(argv)
    assert trainer.global_step == 2
    files = set(os.listdir(out))
    assert {"samples_before.png", "samples_after.png", "metrics.json", "task.json", "elegant_config.json",
            "initial_noise"} <= files
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("proxy_reward", "genuine_reward", "diversity_pairwise_distance", "genuine_class_histogram"):
        assert key in metrics["pretrained"] and key in metrics["elegant"]
    assert metrics["train"]["train/kl"] >= 0
    assert sum(metrics["elegant"]["genuine_class_histogram"]) == pytest.approx(1.0, abs=1e-3)

    with pytest.raises(SystemExit, match="exists and is not empty"):
        train_elegant.run(argv)
    assert os.path.exists(os.path.join(out, "metrics.json"))  # nothing was lost

    grid = str(tmp_path / "grid.png")
    task = json.load(open(os.path.join(out, "task.json")))
    assert task == {"task": "digits", "target_digit": 3, "reward": task["reward"]}  # no path of this machine
    assert "output_dir" not in json.load(open(os.path.join(out, "elegant_config.json")))
    assert cli_main(["sample", out, "--num_samples", "9", "--output", grid, "--cache_dir", cache]) == 0
    from PIL import Image
    assert Image.open(grid).size == (8 * (3 * 9 + 1), 8 * (3 * 9 + 1))  # 3x3 grid of 8x8 digits, 8x enlarged
    report = str(tmp_path / "eval.json")
    assert cli_main(["evaluate", out, "--num_samples", "16", "--output", report, "--cache_dir", cache]) == 0
    result = json.load(open(report))
    assert result["target_digit"] == 3
    assert result["fine_tuned"]["num_samples"] == 16 and "genuine_reward" in result["pretrained"]


@pytest.mark.slow
def test_killed_run_resumes_from_latest_checkpoint_and_reaches_the_step_count(cache, tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, SCRIPT, "--cache_dir", cache, "--output_dir", out, "--train_steps", "12",
           "--checkpointing_steps", "2", "--checkpoints_total_limit", "3", "--resume_from_checkpoint", "latest",
           *TINY]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any(s >= 2 for s, _ in checkpointing.list_checkpoints(out)):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(s for s, _ in checkpointing.list_checkpoints(out))
    assert 2 <= killed_at < 12
    assert not os.path.exists(os.path.join(out, "metrics.json"))

    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.load(open(os.path.join(checkpointing.list_checkpoints(out)[-1][1], "trainer_state.json")))
    assert state["global_step"] == 12
    cfg = state["config"]
    off = cfg["noise_train_steps"] + 1 if cfg["learn_initial_noise"] else 0  # ElegantTrainer.drift_log_offset
    steps = [h["step"] - off for h in state["history"] if "train/reward" in h]
    assert steps == list(range(1, 13))  # the history continues across the kill, no step repeated or lost
    resumed_from = json.load(open(os.path.join(out, "metrics.json")))["train"]["resumed_from"]
    assert resumed_from.endswith(f"checkpoint-{killed_at}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_cpu_processes_keep_identical_lora_and_only_main_writes(cache, tmp_path, fsdp):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), os.path.join(ROOT, "tests", "helpers", "distributed_worker.py"),
           "--cache_dir", cache, "--output_dir", out, "--train_steps", "3", "--checkpointing_steps", "2", *TINY,
           *(["--fsdp"] if fsdp else [])]  # --fsdp: the UNet sharded, evaluation on both processes
    result_dir = tmp_path / "results"
    result_dir.mkdir()
    done = subprocess.run(cmd, env={**env(), "ACCELERATE_USE_CPU": "1", "RESULT_DIR": str(result_dir)},
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.load(open(p)) for p in sorted(result_dir.iterdir())]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["num_processes"] == 2 and r["identical"] and r["sharded"] == fsdp for r in results)
    assert results[0]["lora_norm"] == results[1]["lora_norm"] > 0
    assert [r["writes"] for r in results if r["rank"] == 1] == [[]]
    assert {"metrics.json", "samples_after.png", "checkpoint-2"} <= set(os.listdir(out))


@pytest.mark.slow
def test_a_second_run_under_two_processes_fails_on_every_process(cache, tmp_path):
    """The run lock is the main process's, but its error must stop every process (none left in a collective)."""
    from hf_control_ft.utils.run_lock import RunLock

    out = str(tmp_path / "held")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), os.path.join(ROOT, "examples", "train_elegant.py"),
           "--cache_dir", cache, "--output_dir", out, "--train_steps", "2", "--report_to", "none", *TINY]
    os.makedirs(out)
    with open(os.path.join(out, "kept.txt"), "w") as f:
        f.write("the other run's file")
    with RunLock(out):  # another run holds the directory
        for extra in (["--resume_from_checkpoint", "latest"], ["--overwrite"]):
            done = subprocess.run([*cmd, *extra], env={**env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode != 0
            # both ranks raise the lock's error themselves (rank 1 is not merely killed by the launcher)
            assert done.stderr.count("is in use by another run") >= 2, (extra, done.stderr[-3000:])
    # --overwrite did not delete the directory of the run holding it, and nothing was written into it
    assert sorted(os.listdir(out)) == [".lock", "kept.txt"]
