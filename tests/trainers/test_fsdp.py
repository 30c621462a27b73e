"""The frozen denoiser sharded across processes (FSDP2), the LoRA replicated (issue: what a diffusers user expects,
FSDP for the large families)."""

import json
import os
import subprocess
import sys
import types

import pytest
import yaml
from accelerate.utils import DistributedType

from hf_control_ft import ElegantConfig
from hf_control_ft.trainers.sharding import shard_if_requested

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_shard_the_unet_and_match_one_process(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), os.path.join(ROOT, "tests", "helpers", "fsdp_worker.py"),
           str(tmp_path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "RESULT_DIR": str(results)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.load(open(p)) for p in sorted(results.iterdir())]
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["sharded"] and not r["plain_sharded"]
        assert r["frozen_dtensors"] and r["lora_plain_tensors"] and r["local_fraction"] == pytest.approx(0.5, abs=0.01)
        assert r["own_rel_err"] < 1e-5  # sharded and unsharded network: the same gradient of the same batch
        assert r["averaged_rel_err"] < 1e-5 and r["grad_norm"] > 1  # = one process with both ranks' batches
        assert r["identical"] and r["moved"] > 0  # trained, the adapter equal on both ranks
        assert r["saved_tensors"] == r["lora_tensors"] > 0 and r["saved_full_shapes"] and r["saved_equal"]


def test_an_accelerate_fsdp_config_shards_and_one_process_does_not(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr("hf_control_ft.trainers.sharding.shard_frozen_network",
                        lambda network, trainable, device: calls.append((network, len(trainable))))
    process = types.SimpleNamespace(lora_model=types.SimpleNamespace(named_parameters=lambda: iter([])))

    def shard(distributed_type, num_processes, fsdp=False):
        accelerator = types.SimpleNamespace(distributed_type=distributed_type, num_processes=num_processes)
        return shard_if_requested(ElegantConfig(fsdp=fsdp, report_to=None), accelerator, process, "cpu")

    assert shard(DistributedType.FSDP, 2) and len(calls) == 1
    assert shard(DistributedType.MULTI_CPU, 2, fsdp=True) and len(calls) == 2
    assert not shard(DistributedType.MULTI_GPU, 2) and len(calls) == 2
    with caplog.at_level("INFO", logger="hf_control_ft"):
        assert not shard(DistributedType.FSDP, 1)
    assert "one process, nothing to shard" in caplog.text


def test_the_shipped_fsdp_config_is_an_fsdp2_launch():
    with open(os.path.join(ROOT, "examples", "accelerate", "fsdp.yaml")) as fh:
        config = yaml.safe_load(fh)
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2


def test_seiko_refuses_fsdp_naming_the_flag():
    from hf_control_ft import SeikoConfig

    with pytest.raises(ValueError, match=r"SeikoConfig\.fsdp"):
        SeikoConfig(fsdp=True, report_to=None)
