"""Two-KL sampler (SEIKO): the per-step KL to a frozen reference adapter and its exact gradient."""

import torch

from hf_control_ft.core.control import add_reference_adapter, lora_parameters, reference_adapter_mode
from hf_control_ft.core.sampler import ControlledSampler
from hf_control_ft.core.scheduling import DiffusionSchedule
from hf_control_ft.testing import ddim, ddpm, make_mlp_denoiser


def _two_adapter_model(seed=0):
    model = make_mlp_denoiser(perturb=0.2, seed=seed)
    add_reference_adapter(model, "previous")
    for p, q in zip(lora_parameters(model, "previous"), lora_parameters(model, "control")):
        assert torch.equal(p, q)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in lora_parameters(model, "previous"):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_reference_kl_equals_closed_form_and_reference_stays_frozen():
    model = _two_adapter_model()
    s = ControlledSampler(model, DiffusionSchedule(ddim(), 6, 0.7), reference_adapter="previous")
    x = torch.randn(7, 2)
    for k in s.schedule.random_steps():
        _, kl, kl_ref = s.step_with_kls(x, k, torch.randn(7, 2))
        t = s.schedule.timestep(k)
        mu_ft = s.schedule.mean(model(x, t).sample, x, k)
        with reference_adapter_mode(model, "previous"):
            mu_prev = s.schedule.mean(model(x, t).sample, x, k)
        std = float(s.schedule.std[k])
        ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu_ft, std),
                                                torch.distributions.Normal(mu_prev, std)).sum(1)
        torch.testing.assert_close(kl_ref, ref, rtol=1e-5, atol=1e-7)
        assert (kl_ref > 0).all() and not torch.allclose(kl_ref, kl)
        assert not torch.allclose(mu_prev, mu_ft)
    # the context restores the trainable control adapter and never unfreezes the reference
    assert all(p.requires_grad for p in lora_parameters(model, "control"))
    assert not any(p.requires_grad for p in lora_parameters(model, "previous"))
    # a reference adapter equal to the control gives zero reference KL
    with torch.no_grad():
        for p, q in zip(lora_parameters(model, "previous"), lora_parameters(model, "control")):
            p.copy_(q)
    traj = s.rollout(torch.randn(5, 2), torch.Generator().manual_seed(0), measure_kl=True)
    torch.testing.assert_close(traj.ref_kl, torch.zeros(5), atol=1e-10, rtol=0)
    assert traj.kl.min() > 0


def test_two_kl_backward_sweep_equals_autograd_float64():
    torch.set_default_dtype(torch.float64)
    try:
        model = _two_adapter_model().double()
        alpha, beta, B = 0.7, 1.3, 4
        w = torch.tensor([1.0, -2.0])
        for checkpointing in (True, False):
            s = ControlledSampler(model, DiffusionSchedule(ddpm(), 5, 1.0), gradient_checkpointing=checkpointing,
                                  reference_adapter="previous")
            params = lora_parameters(model)
            x_T = torch.randn(B, 2).requires_grad_(True)
            x0, kl, kl_ref = s.differentiable_sample(x_T, torch.Generator().manual_seed(3), return_reference_kl=True)
            loss = (-(x0 * w).sum(1) + alpha * kl + beta * kl_ref).mean()
            ref = torch.autograd.grad(loss, params + [x_T])
            assert all(p.grad is None for p in lora_parameters(model, "previous"))
            for p in params:
                p.grad = None
            traj = s.rollout(x_T.detach(), torch.Generator().manual_seed(3))
            torch.testing.assert_close(traj.samples, x0.detach())
            adjoint = s.backpropagate(traj, -w.expand(B, 2) / B, alpha / B, reference_kl_weight=beta / B)
            torch.testing.assert_close(traj.kl, kl.detach())
            torch.testing.assert_close(traj.ref_kl, kl_ref.detach())
            for p, g in zip(params, ref[:-1]):
                torch.testing.assert_close(p.grad, g)
            torch.testing.assert_close(adjoint, ref[-1])
            assert all(p.grad is None for p in lora_parameters(model, "previous"))
            # the reference term really changes the gradient
            for p in params:
                p.grad = None
            traj = s.rollout(x_T.detach(), torch.Generator().manual_seed(3))
            s.backpropagate(traj, -w.expand(B, 2) / B, alpha / B)
            diff = sum(float((p.grad - g).norm()) for p, g in zip(params, ref[:-1]))
            assert diff > 1e-3 * sum(float(g.norm()) for g in ref[:-1])
    finally:
        torch.set_default_dtype(torch.float32)
