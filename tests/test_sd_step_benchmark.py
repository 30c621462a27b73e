"""benchmarks/sd_step.py: every family in its own process, a JSON line each as soon as it is measured, a family
past its time limit reported as such (the GPU window may close at any moment)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_each_family_reports_as_soon_as_measured_and_a_slow_one_times_out(tmp_path):
    out = tmp_path / "sd_step.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "sd_step.py"), "--tiny", "--batch_sizes", "2",
           "--no_flops", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, "--models", "sd15", "flux", "wan", "--time_limit", "120"], capture_output=True, text=True,
                          timeout=400, env=env, cwd=os.path.join(ROOT, "benchmarks"))
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([*cmd, "--models", "sdxl", "--time_limit", "0.5"], capture_output=True, text=True,
                          timeout=100, env=env, cwd=os.path.join(ROOT, "benchmarks"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["model"] for r in records] == ["tiny-random-sd15", "tiny-random-flux", "tiny-random-wan", "sdxl"]
    assert records[3] == {"model": "sdxl", "timed_out": True, "time_limit_s": 0.5}
    assert records[2]["shape"]["num_frames"] == 5  # a video family at its own shape
    for r in records[:3]:
        (res,) = r["results"]
        assert res["batch_size"] == 2 and res["time_ratio"] > 0 and res["grpo_time_ratio"] > 0
        for mode in ("elegant", "plain_reward_backprop", "grpo_update"):
            assert res[mode]["seconds_per_sample"] == pytest.approx(res[mode]["seconds_per_iteration"] / 2, abs=1e-3)


def test_a_family_cut_off_reports_the_modes_it_finished(tmp_path, monkeypatch, capsys):
    """The child prints a ``{"partial": ...}`` line per mode as soon as it is warm and again when measured; a
    family past ``--time_limit`` keeps those lines (subprocess hands them over as bytes)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import sd_step
    finally:
        sys.path.pop(0)
    lines = [{"partial": {"model": "flux", "batch_size": 1, "mode": "elegant", "build_s": 2.0,
                          "first_iteration_s": 40.0}},
             {"partial": {"model": "flux", "batch_size": 1, "mode": "elegant", "seconds_per_iteration": 30.0}}]
    stdout = ("\n".join(json.dumps(line) for line in lines) + "\nnot json\n").encode()

    def cut_off(cmd, **kwargs):
        assert kwargs["timeout"] == 7.0 and "--model" in cmd and "flux" in cmd
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], output=stdout)

    monkeypatch.setattr(sd_step.subprocess, "run", cut_off)
    out = tmp_path / "families.jsonl"
    sd_step.main(["--models", "flux", "--time_limit", "7", "--device", "cpu", "--output", str(out)])
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record == {"model": "flux", "timed_out": True, "time_limit_s": 7.0,
                      "partial": [line["partial"] for line in lines]}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record


def test_script_step_runs_the_training_script_on_random_weights():
    """``benchmarks/script_step.py``: train_elegant.py's own path on a random-weight pipeline (the GPU run of the
    scale issue is this command at real shapes), one JSON line with the exit status, wall time and metrics."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "script_step.py"), "--model", "sd3",
                           "--tiny", "--train_steps", "1", "--", "--lora_rank", "2"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=os.path.join(ROOT, "benchmarks"))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["exit_status"] == 0 and record["model"] == "tiny-random-sd3" and record["wall_s"] > 0
    assert record["script_flags"] == ["--lora_rank", "2"]
    assert record["metrics"]["metrics"]["KL per sample, chain + start law (nats)"] >= 0


@pytest.mark.slow
def test_the_fast_mode_is_measured_bf16_passes_and_a_quarter_of_the_steps(tmp_path):
    """What a GPU window must time besides the exact mode: bf16 KL passes, value-guided drift on a quarter of the
    steps (FLOPs of the values' autograd.grad cannot be counted by the module tracker: said, not hidden)."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "sd_step.py"), "--tiny", "--model", "sd15", "--batch_sizes",
           "1", "--repeats", "1", "--dtype", "bf16", "--kl_precision", "autocast", "--drift_objective", "value_guided",
           "--train_timestep_fraction", "0.25", "--compact"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=os.path.join(ROOT, "benchmarks"))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert (record["kl_precision"], record["drift_objective"], record["train_timestep_fraction"]) == \
        ("autocast", "value_guided", 0.25)
    (res,) = record["results"]
    assert res["elegant"]["seconds_per_iteration"] > 0 and "flops_not_counted" in res["elegant"]


def test_the_prepared_gpu_window_command_uses_flags_that_exist():
    import re

    script = open(os.path.join(ROOT, "benchmarks", "gpu_window.sh")).read()
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_window.sh")]).returncode == 0
    source = open(os.path.join(ROOT, "benchmarks", "sd_step.py")).read()
    body = script.split("step() {", 1)[1]
    flags = set(re.findall(r"(--[a-z_0-9]+)", body))
    assert {"--kl_precision", "--drift_objective", "--train_timestep_fraction", "--models", "--time_limit"} <= flags
    assert all(f'"{flag}"' in source for flag in flags), sorted(f for f in flags if f'"{f}"' not in source)
