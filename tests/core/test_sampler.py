import pytest
import torch

from hf_control_ft.core.control import lora_parameters, pretrained_mode, set_control_enabled
from hf_control_ft.core.sampler import ControlledSampler
from hf_control_ft.core.scheduling import DiffusionSchedule
from hf_control_ft.models.initial_noise import InitialNoiseModel
from hf_control_ft.testing import ddim, ddpm, make_mlp_denoiser


def _sampler(model, steps=6, eta=0.7, scheduler=None, **kw):
    return ControlledSampler(model, DiffusionSchedule(scheduler or ddim(), steps, eta), **kw)


def test_per_step_kl_equals_closed_form_gaussian_kl():
    model = make_mlp_denoiser(perturb=0.3)
    s = _sampler(model)
    x = torch.randn(7, 2)
    assert s.schedule.random_steps() == [0, 1, 2, 3]  # the jump t = 166 -> 0 and the step to alpha_bar = 1 are not
    for k in s.schedule.random_steps():
        _, kl = s.step_with_kl(x, k, torch.randn(7, 2))
        std = float(s.schedule.std[k])
        mu_ft = s.schedule.mean(model(x, s.schedule.timestep(k)).sample, x, k)
        with pretrained_mode(model):
            mu_pre = s.schedule.mean(model(x, s.schedule.timestep(k)).sample, x, k)
        ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu_ft, std),
                                                torch.distributions.Normal(mu_pre, std)).sum(1)
        torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-7)
        assert (kl > 0).all()


def test_kl_is_zero_for_fresh_adapter_and_for_disabled_adapter():
    fresh = make_mlp_denoiser()  # peft initialises lora_B = 0: zero control
    traj = _sampler(fresh).rollout(torch.randn(5, 2), torch.Generator().manual_seed(0), measure_kl=True)
    assert torch.equal(traj.kl, torch.zeros(5))
    trained = make_mlp_denoiser(perturb=0.5)
    s = _sampler(trained)
    assert s.rollout(torch.randn(5, 2), measure_kl=True).kl.min() > 0
    set_control_enabled(trained, False)
    traj = s.rollout(torch.randn(5, 2), measure_kl=True)
    assert torch.equal(traj.kl, torch.zeros(5))


def _loss_grads(sampler, x_T, gen_seed, reward_weight):
    """Autograd reference: gradient of mean(-r + a*KL) through differentiable_sample."""
    params = lora_parameters(sampler.model)
    x_T = x_T.clone().requires_grad_(True)
    x0, kl = sampler.differentiable_sample(x_T, torch.Generator().manual_seed(gen_seed))
    loss = (-(x0 * reward_weight).sum(1) + 0.7 * kl).mean()
    grads = torch.autograd.grad(loss, params + [x_T])
    return x0.detach(), kl.detach(), grads


@pytest.mark.parametrize("flow", [False, True])
def test_backward_sweep_equals_autograd_through_the_sampler(flow):
    """DDPM, and the flow-matching chain of SD3's grid (shift 3, eta 0.5: a jump and the step to 0 are
    deterministic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hf_control_ft.core.flow_matching import FlowMatchSchedule

    torch.set_default_dtype(torch.float64)
    try:
        model = make_mlp_denoiser(perturb=0.2).double()
        for checkpointing in (True, False):
            s = (ControlledSampler(model, FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 5, 0.5),
                                   gradient_checkpointing=checkpointing) if flow else
                 _sampler(model, steps=5, scheduler=ddpm(), eta=1.0, gradient_checkpointing=checkpointing))
            w = torch.tensor([1.0, -2.0])
            x_T = torch.randn(4, 2)
            x0, kl, ref = _loss_grads(s, x_T, 3, w)
            params = lora_parameters(model)
            for p in params:
                p.grad = None
            traj = s.rollout(x_T, torch.Generator().manual_seed(3))
            torch.testing.assert_close(traj.samples, x0)
            adjoint = s.backpropagate(traj, -w.expand(4, 2) / 4, 0.7 / 4)
            torch.testing.assert_close(traj.kl, kl)
            for p, g in zip(params, ref[:-1]):
                torch.testing.assert_close(p.grad, g)
            torch.testing.assert_close(adjoint, ref[-1])
            assert max(float(g.abs().max()) for g in ref[:-1]) > 1e-4  # gradients really reach the LoRA
    finally:
        torch.set_default_dtype(torch.float32)


class _DetachedPretrainedMean(ControlledSampler):
    def step_with_kl(self, x, k, noise):
        if not self.schedule.is_stochastic(k):
            return super().step_with_kl(x, k, noise)
        mu_ft = self.mean(x, k, controlled=True)
        mu_pre = self.mean(x, k, controlled=False).detach()
        kl = ((mu_ft - mu_pre) ** 2).sum(1) / (2 * float(self.schedule.std[k]) ** 2)
        return self.schedule.step_from_mean(mu_ft, k, noise), kl


def test_kl_gradient_flows_through_the_pretrained_mean():
    model = make_mlp_denoiser(perturb=0.1)
    sched = DiffusionSchedule(ddim(), 6, 1.0)
    x_T = torch.randn(8, 2)
    _, _, full = _loss_grads(ControlledSampler(model, sched), x_T, 0, torch.zeros(2))
    _, _, detached = _loss_grads(_DetachedPretrainedMean(model, sched), x_T, 0, torch.zeros(2))
    diff = sum(float((a - b).norm()) for a, b in zip(full[:-1], detached[:-1]))
    assert diff > 1e-3 * sum(float(a.norm()) for a in full[:-1])


def test_gradients_reach_initial_noise_parameters():
    model = make_mlp_denoiser(perturb=0.2)
    noise_model = InitialNoiseModel((2,), num_steps=4, hidden=16)
    s = _sampler(model)
    x_T, kl_init = noise_model(6, torch.Generator().manual_seed(0))
    x0, kl = s.differentiable_sample(x_T, torch.Generator().manual_seed(1))
    (-(x0.sum(1)) + kl + kl_init).mean().backward()
    grads = [p.grad for p in noise_model.parameters()]
    assert all(g is not None for g in grads)
    assert max(float(g.abs().max()) for g in grads) > 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora_parameters(model))


def test_truncated_backprop_only_reaches_the_last_steps():
    model = make_mlp_denoiser(perturb=0.2)
    s = _sampler(model, steps=6, truncate_backprop_steps=3)  # the window: steps 3 (random), 4 and 5
    x_T = torch.randn(4, 2, requires_grad=True)
    x0, kl = s.differentiable_sample(x_T, torch.Generator().manual_seed(0))
    assert x0.grad_fn is not None and kl.shape == (4,)
    (x0.sum() + kl.sum()).backward()
    assert x_T.grad is None  # nothing flows past the truncation window
    traj = s.rollout(x_T.detach(), torch.Generator().manual_seed(0))
    assert (traj.kl_steps[:3] > 0).all()  # measured during the rollout, outside the window
    s.backpropagate(traj, torch.ones(4, 2), 1.0)
    torch.testing.assert_close(traj.kl, kl.detach())


def test_sampling_is_deterministic_under_a_generator():
    model = make_mlp_denoiser(perturb=0.2)
    s = _sampler(model, scheduler=ddpm(), eta=1.0)
    a = s.sample(torch.zeros(3, 2), torch.Generator().manual_seed(5))
    b = s.sample(torch.zeros(3, 2), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_step_weight_power_scales_each_steps_parameter_gradient_and_keeps_the_adjoint():
    """``backpropagate(step_weight_power=p)``: the LoRA gradient is ``sum_k c_k g_k`` with ``g_k`` what step ``k``'s
    network call contributes (reference: a chain whose step ``k`` runs its own copy of the adapter) and
    ``c_k = (sigma_k^2 / mean sigma^2)^p``; ``dL/dx_T`` is the unweighted chain rule's."""
    import copy

    model = make_mlp_denoiser(perturb=0.3)
    s = _sampler(model, steps=6, eta=0.7)
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(5, 2, generator=gen)
    traj = s.rollout(x_T, gen)
    cot = torch.randn(5, 2, generator=gen) / 5
    params = lora_parameters(model)

    def swept(power):
        for p in params:
            p.grad = None
        adjoint = s.backpropagate(copy.deepcopy(traj), cot, 0.7 / 5, step_weight_power=power)
        return [p.grad.clone() for p in params], adjoint

    plain, adjoint_plain = swept(0.0)
    weighted, adjoint_weighted = swept(1.0)
    torch.testing.assert_close(adjoint_weighted, adjoint_plain, rtol=1e-5, atol=1e-7)
    var = [float(s.schedule.std[k]) ** 2 for k in s.schedule.random_steps()]
    c = {k: v / (sum(var) / len(var)) for k, v in zip(s.schedule.random_steps(), var)}
    assert max(c.values()) / min(c.values()) > 2  # the weights differ enough to show
    copies = [copy.deepcopy(model) for _ in range(len(s.schedule))]
    x = x_T.clone().requires_grad_(True)
    loss = 0.0
    for k, m in enumerate(copies):
        x, kl_k = _sampler(m, steps=6, eta=0.7).step_with_kl(x, k, traj.noises[k])
        loss = loss + 0.7 / 5 * kl_k.sum()
    (loss + (cot * x).sum()).backward()
    torch.testing.assert_close(x.detach(), traj.samples)
    expected = [sum(c.get(k, 1.0) * lora_parameters(m)[i].grad for k, m in enumerate(copies)
                    if lora_parameters(m)[i].grad is not None) for i in range(len(params))]
    for got, want in zip(weighted, expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    assert sum(float((a - b).norm()) for a, b in zip(weighted, plain)) > 1e-3 * sum(float(a.norm()) for a in plain)
