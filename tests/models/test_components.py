import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from hf_control_ft.core.control import add_lora_control, default_target_modules, lora_parameters, resolve_target_modules
from hf_control_ft.models.initial_noise import InitialNoiseModel
from hf_control_ft.models.value_function import ValueFunction, safe_exp
from hf_control_ft.testing import make_mlp_denoiser


def test_missing_lora_targets_name_the_candidates():
    model = make_mlp_denoiser(lora=False)
    with pytest.raises(ValueError) as err:
        add_lora_control(model, 4, target_modules=["to_q", "net.inp"])
    msg = str(err.value)
    assert "['to_q']" in msg and "net.inp" in msg and "net.blocks.0.1" in msg


def test_default_targets_plain_module_and_diffusers_unet():
    mlp = make_mlp_denoiser(lora=False)
    targets = default_target_modules(mlp)
    assert "net.inp" in targets and all(isinstance(t, str) for t in targets)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=8)
    assert resolve_target_modules(unet, None) == ["to_q", "to_k", "to_v", "to_out.0"]
    add_lora_control(unet, 2)  # through diffusers' add_adapter
    names = [n for n, _ in unet.named_parameters() if "lora_A.control" in n]
    assert names and all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    assert all(p.requires_grad for p in lora_parameters(unet))
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora" not in n)


def test_initial_noise_model_zero_drift_is_standard_normal_with_zero_kl(tmp_path):
    m = InitialNoiseModel((3,), num_steps=10, hidden=16)
    x, kl = m(20000, torch.Generator().manual_seed(0))
    assert torch.equal(kl, torch.zeros(20000))
    assert x.mean(0).abs().max() < 0.03 and (x.std(0) - 1).abs().max() < 0.03
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    x, kl = m(8, torch.Generator().manual_seed(1))
    # KL = sum_j ||g(s_j, y_j)||^2 ds / 2 recomputed from the same path
    gen, y, ref = torch.Generator().manual_seed(1), torch.zeros(8, 3), torch.zeros(8)
    for j in range(10):
        g = m.drift(y, j / 10)
        ref += 0.05 * g.pow(2).sum(1)
        y = y + g / 10 + math.sqrt(0.1) * torch.randn(y.shape, generator=gen)
    torch.testing.assert_close(kl, ref)
    torch.testing.assert_close(x, y)
    m.save_pretrained(tmp_path / "noise")
    assert (tmp_path / "noise" / "model.safetensors").exists()
    loaded = InitialNoiseModel.from_pretrained(tmp_path / "noise")
    assert torch.equal(loaded.sample(4, torch.Generator().manual_seed(2)), m.sample(4, torch.Generator().manual_seed(2)))


def test_value_function_recovers_soft_value_and_survives_huge_reward_over_alpha():
    # r = a x + N(0, s^2) given x  =>  v(x) = alpha log E exp(r / alpha) = a x + s^2 / (2 alpha)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1, generator=g)
    a, s, alpha = 1.5, 0.5, 1.0
    r = a * x[:, 0] + s * torch.randn(4096, generator=g)
    vf = ValueFunction((1,), alpha, hidden=32, depth=2)
    vf.fit(x, r, steps=600, lr=3e-3, generator=g, progress=False)
    grid = torch.linspace(-1.5, 1.5, 31)[:, None]
    with torch.no_grad():
        err = (vf(grid) - (a * grid[:, 0] + s**2 / (2 * alpha))).abs().max()
    assert err < 0.15
    # r / alpha ~ 1e5: finite loss, finite value near the best reward
    vf2 = ValueFunction((1,), 1e-4, hidden=16, depth=1)
    loss = vf2.fit(x, 10 * r, steps=20, generator=g, progress=False)
    assert math.isfinite(loss)
    with torch.no_grad():
        v = vf2(grid)
    assert torch.isfinite(v).all() and float(v.max()) <= float((10 * r).max()) + 1e-3
    assert torch.isfinite(safe_exp(torch.tensor([1e6]))).all()


def test_value_fit_that_memorises_noise_is_replaced_by_the_constant(caplog):
    """A reward independent of x_T with a wide spread (s_r / alpha = 10) on 64-dim starts: the network memorises
    the pairs (held-out loss far above the constant's), so the fit keeps the constant value and says so."""
    import logging

    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(256, 1, 8, 8, generator=g), 10 * torch.randn(256, generator=g)
    vf = ValueFunction((1, 8, 8), 1.0, hidden=64)
    with caplog.at_level(logging.WARNING, logger="hf_control_ft.models.value_function"):
        loss = vf.fit(x, r, steps=300, lr=1e-3, generator=g, progress=False)
    v = vf.validation
    assert v["held_out"] == 51 and not v["kept_fit"]
    assert v["held_out_loss"] > 10 * (v["constant_held_out_loss"] + 1)  # what the plain fit would have kept
    assert loss == pytest.approx(1.0, abs=1e-5)  # the constant's training loss, mean exp((r - c) / alpha)
    with torch.no_grad():
        assert torch.equal(vf.normalized(torch.randn(5, 1, 8, 8)), torch.zeros(5))
    assert "does worse than a constant on 51 held-out rollouts" in caplog.text


def test_value_fit_that_generalises_is_the_plain_fit():
    """A learnable value (linear reward plus noise): the held-out check keeps the fit, and the fit on all pairs
    is bit-identical to one without the check (same initialisation and batch stream)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1, generator=g)
    r = 1.5 * x[:, 0] + 0.5 * torch.randn(1024, generator=g)
    fits = []
    for fraction in (0.2, 0.0):
        torch.manual_seed(3)
        vf = ValueFunction((1,), 1.0, hidden=32, depth=2)
        gen = torch.Generator().manual_seed(4)
        vf.fit(x, r, steps=200, lr=3e-3, generator=gen, progress=False, validation_fraction=fraction)
        fits.append((vf, torch.randint(0, 10**6, (3,), generator=gen)))  # the stream after the fit
    (checked, after_checked), (plain, after_plain) = fits
    assert checked.validation["kept_fit"] and checked.validation["held_out"] == 204
    assert checked.validation["held_out_loss"] < checked.validation["constant_held_out_loss"] - 0.5
    assert plain.validation == {"held_out": 0, "kept_fit": True}
    for a, b in zip(checked.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(after_checked, after_plain)


def test_value_fit_with_a_non_finite_held_out_score_is_replaced_by_the_constant(monkeypatch):
    """A fit whose held-out score is NaN (e.g. it diverged) is not kept."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, generator=g)
    vf = ValueFunction((1,), 1.0, hidden=8, depth=1)
    monkeypatch.setattr(vf, "_held_out_loss", lambda *a, **k: float("nan"))  # the fit's held-out score
    vf.fit(x, x[:, 0], steps=5, generator=g, progress=False)
    assert vf.validation["held_out"] == 51 and not vf.validation["kept_fit"]
    with torch.no_grad():
        assert torch.equal(vf.normalized(x[:4]), torch.zeros(4))
