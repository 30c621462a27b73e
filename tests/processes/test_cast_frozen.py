"""Frozen networks are cast to the run's dtype without diffusers' warning about ``to()`` (printed on every run
before), and parameters a model marks ``_keep_in_fp32_modules`` stay fp32, as ``from_pretrained`` keeps them."""

import logging

import torch
from torch import nn

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.processes.upcast import cast_frozen
from hf_control_ft.testing import tiny_sd_pipeline


def test_building_a_half_precision_trainer_prints_no_cast_warning(caplog):
    cfg = ElegantConfig(alpha=1.0, num_inference_steps=2, learn_initial_noise=False, batch_size=1, report_to=None)
    with caplog.at_level(logging.WARNING):
        trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), None, cfg, prompts=["a cat"],
                                               mixed_precision="bf16", kl_precision="upcast")
    assert not [r for r in caplog.records if "should be kept in float32" in r.getMessage()]
    assert trainer.process.pipeline.unet.dtype == trainer.process.pipeline.vae.dtype == torch.bfloat16


def test_modules_marked_fp32_stay_fp32():
    class Net(nn.Module):
        _keep_in_fp32_modules = ["norm"]

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.block = nn.ModuleDict({"norm": nn.LayerNorm(4), "normal": nn.Linear(4, 4)})

    net = cast_frozen(Net(), torch.bfloat16)
    dtypes = {name: p.dtype for name, p in net.named_parameters()}
    assert dtypes["proj.weight"] == dtypes["block.normal.weight"] == torch.bfloat16  # "normal" is not "norm"
    assert dtypes["norm.weight"] == dtypes["block.norm.bias"] == torch.float32
