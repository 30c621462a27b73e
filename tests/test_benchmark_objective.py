"""benchmarks/elegant_objective.py's measurements: the optimum J* it judges runs by, and the proximal outer loop
(benchmarks/proximal.py)."""

import math
import os
import sys

import pytest
import torch

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.core.control import CONTROL_ADAPTER, lora_parameters
from hf_control_ft.testing import ddim, make_mlp_denoiser

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _trainer(**kw):
    cfg = ElegantConfig(**{**dict(alpha=0.5, num_inference_steps=4, train_steps=3, batch_size=16, learning_rate=5e-2,
                                  learn_initial_noise=False, drift_objective="pathwise", report_to=None), **kw})
    return ElegantTrainer(cfg, make_mlp_denoiser(lora=False), ddim(), lambda x: x[:, 0], (2,))


def test_the_optimum_is_alpha_log_mean_exp_of_the_pretrained_rewards():
    from elegant_objective import optimum

    trainer = _trainer()
    j_star, se, j_pre = optimum(trainer, lambda x: torch.tanh(x[:, 0]), 4096, seed=3)
    x = trainer.sample(4096, generator=torch.Generator().manual_seed(3), batch_size=1024, controlled=False)
    w = torch.exp(torch.tanh(x[:, 0].double()) / 0.5)
    assert j_star == pytest.approx(0.5 * math.log(float(w.mean())), rel=1e-6)
    assert j_pre == pytest.approx(0.5 * float(w.log().mean()), rel=1e-6)
    assert se == pytest.approx(0.5 * float(w.std() / w.mean()) / 64, rel=1e-6)  # the delta method, sqrt(4096)
    assert j_pre + 0.01 < j_star  # Jensen: the tilt gains over the pretrained model's reward


def test_proximal_anchor_is_the_previous_iterate_and_its_kl_is_added():
    from proximal import ANCHOR, attach_proximal

    trainer = _trainer()
    refresh = attach_proximal(trainer, beta=2.0, every=2)
    outs, anchors = [], []
    iterate = trainer.drift_iteration

    def recording(*args, **kwargs):
        outs.append(iterate(*args, **kwargs))
        return outs[-1]

    trainer.drift_iteration = recording

    def snapshot(adapter):
        return [p.detach().clone() for p in lora_parameters(trainer.process.lora_model, adapter)]

    start, controls = snapshot(CONTROL_ADAPTER), []

    def callback(t, step):
        refresh(step)
        anchors.append(snapshot(ANCHOR))
        controls.append(snapshot(CONTROL_ADAPTER))

    trainer.train(callback=callback)
    # the first iterations' anchor is the zero control (the pretrained chain): its KL is the KL to the pretrained
    assert torch.allclose(outs[0]["ref_kl"], outs[0]["kl"], rtol=1e-5, atol=1e-7)
    assert float(outs[0]["kl"].mean()) == 0.0 and float(outs[1]["kl"].mean()) > 0
    assert torch.allclose(outs[1]["ref_kl"], outs[1]["kl"], rtol=1e-5, atol=1e-7)
    # the anchor is the starting control until iteration 2, then the control of that moment, kept through 3
    assert all(torch.equal(a, c) for a, c in zip(anchors[0], start))
    assert all(torch.equal(a, c) for a, c in zip(anchors[1], controls[1]))
    assert not all(torch.equal(a, c) for a, c in zip(anchors[1], start))
    assert all(torch.equal(a, b) for a, b in zip(anchors[2], anchors[1]))
    assert not all(torch.equal(a, c) for a, c in zip(anchors[2], controls[2]))  # trained at 3, not refreshed
    assert float((outs[2]["kl"] - outs[2]["ref_kl"]).abs().max()) > 1e-6  # iteration 3's chain differs from both


def test_proximal_refuses_a_regression_objective():
    from proximal import attach_proximal

    with pytest.raises(SystemExit, match="pathwise"):
        attach_proximal(_trainer(drift_objective="adjoint_matching"), beta=1.0, every=2)
