"""An out-of-memory stop during training is answered with one line: where, the memory switches still off, the
preset, and sharding across GPUs (issue: what a diffusers user expects on the first real run)."""

import types

import pytest
import torch

from hf_control_ft import ElegantConfig
from hf_control_ft.scripts.text_to_image import _train


def _trainer(step, **config):
    def train(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    return types.SimpleNamespace(train=train, global_step=step,
                                 config=ElegantConfig(report_to=None, **config))


def test_out_of_memory_names_the_switches_still_off_in_one_line(capsys):
    args = types.SimpleNamespace(preset_family="flux", kl_precision="delta", pre_compute_text_embeddings=True,
                                 offload=False, enable_vae_slicing=True)
    with pytest.raises(SystemExit) as stop:
        _train(_trainer(7, batch_size=2, gradient_checkpointing=True), args)
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: out of accelerator memory at drift step 8")
    assert "--offload" in err and "--batch_size 1 --gradient_accumulation_steps N" in err  # still off
    assert "--kl_precision delta," not in err and "--gradient_checkpointing" not in err  # already on
    assert "the flux preset already sets the others" in err and "examples/accelerate/fsdp.yaml" in err
    assert "Traceback" not in err


def test_out_of_memory_before_the_drift_says_so(capsys):
    args = types.SimpleNamespace(preset_family=None, kl_precision="fp32", pre_compute_text_embeddings=False,
                                 offload=False, enable_vae_slicing=False)
    with pytest.raises(SystemExit):
        _train(_trainer(0, gradient_checkpointing=False), args)
    err = capsys.readouterr().err
    assert "before the first drift step" in err and "--kl_precision delta" in err and "--gradient_checkpointing" in err
