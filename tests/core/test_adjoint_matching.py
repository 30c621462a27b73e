import functools

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.core.adjoint_matching import adjoint_matching_backward, lean_adjoints
from hf_control_ft.core.control import add_lora_control, lora_parameters
from hf_control_ft.core.sampler import ControlledSampler
from hf_control_ft.core.flow_matching import FlowMatchSchedule
from hf_control_ft.core.scheduling import DiffusionSchedule
from hf_control_ft.models.step_values import StepValueFunction, select_states
from hf_control_ft.testing import ddim, make_mlp_denoiser

# a DDIM chain and a flow-matching chain (SD3's shift 3: its grid ends with a deterministic jump, then the step to 0)
SCHEDULES = {
    "ddim": lambda steps, eta: DiffusionSchedule(ddim(set_alpha_to_one=True), steps, eta),
    "flow": lambda steps, eta: FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0), steps, eta),
}


def _float64(fn):
    @functools.wraps(fn)  # keeps the signature, so pytest sees parametrized arguments
    def wrapped(*args, **kwargs):
        torch.set_default_dtype(torch.float64)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_default_dtype(torch.float32)
    return wrapped


def _reward(x):
    return torch.sin(x[:, 0]) * x[:, 1] + 0.3 * x.pow(2).sum(1)


def _autograd_adjoints(sampler, x_T, gen_seed):
    """``d r(x_K) / d x_k`` through a chain whose step ``k`` is ``mu_pre(x_k) + stopgrad(u_k) + sigma_k eps_k``."""
    gen = torch.Generator().manual_seed(gen_seed)
    x = x_T.clone().requires_grad_(True)
    states = [x]
    for k in range(len(sampler.schedule)):
        noise = sampler._noise(x, k, gen)
        mu_pre = sampler.mean(x, k, controlled=False)
        u = (sampler.mean(x, k, controlled=True) - mu_pre).detach()
        x = sampler.schedule.step_from_mean(mu_pre + u, k, noise)
        x.retain_grad()
        states.append(x)
    _reward(x).sum().backward()
    return [s.grad for s in states]


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
@_float64
def test_lean_adjoint_equals_autograd_through_the_pretrained_chain(kind):
    for perturb in (0.0, 0.3):  # zero control: the plain chain; non-zero: pretrained Jacobians only
        model = make_mlp_denoiser(perturb=perturb).double()
        s = ControlledSampler(model, SCHEDULES[kind](6, 0.5))
        assert not s.schedule.is_stochastic(5)  # the deterministic last step is covered too
        x_T = torch.randn(5, 2)
        ref = _autograd_adjoints(s, x_T, 7)
        traj = s.rollout(x_T, torch.Generator().manual_seed(7))
        x0 = traj.samples.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_reward(x0).sum(), x0)
        adj = lean_adjoints(s, traj, grad)
        assert len(adj) == 7
        for a, b in zip(adj, ref):
            torch.testing.assert_close(a, b)
        if perturb == 0.0:  # with zero control the rollout is the pretrained chain: a_0 = d r / d x_T
            x_T2 = x_T.clone().requires_grad_(True)
            out = s.differentiable_sample(x_T2, torch.Generator().manual_seed(7))[0]
            (g,) = torch.autograd.grad(_reward(out).sum(), x_T2)
            torch.testing.assert_close(adj[0], g)


class _AffineDenoiser(nn.Module):
    """``eps(x, t) = W x + b + shift(onehot(t))``: an affine pretrained chain (Gaussian, exactly solvable);
    the LoRA on ``shift`` can represent any per-step constant control."""

    def __init__(self, timesteps):
        super().__init__()
        self.index = {int(t): i for i, t in enumerate(timesteps)}
        self.net = nn.Linear(2, 2)
        self.shift = nn.Linear(len(timesteps), 2, bias=False)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x, t):
        idx = torch.tensor([self.index[int(v)] for v in t])
        onehot = nn.functional.one_hot(idx, len(self.index)).to(x.dtype)
        return self.net(x) + self.shift(onehot)


def _set_control(model, sampler, targets):
    """Sets the rank-2 LoRA on ``shift`` so that ``mu_ft - mu_pre = targets[k]`` (constant in x) at every step."""
    K = len(sampler.schedule)
    cols = []
    for k in range(K):
        zero = torch.zeros(1, 2)
        gain = sampler.schedule.mean(torch.ones(1, 2), zero, k) - sampler.schedule.mean(zero, zero, k)
        cols.append(targets[k] / gain[0] if sampler.schedule.is_stochastic(k) else torch.zeros(2))
    delta = torch.stack(cols, dim=1)  # (2, K): eps shift per step
    lora_a, lora_b = [m for n, m in model.named_modules() if n.endswith("lora_A.control")], \
                     [m for n, m in model.named_modules() if n.endswith("lora_B.control")]
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    with torch.no_grad():
        lora_b[0].weight.copy_(u * sv)
        lora_a[0].weight.copy_(vh)


@pytest.mark.parametrize("kind", ["ddim", "flow"])
@_float64
def test_regression_gradient_vanishes_at_the_exact_optimum_of_a_gaussian_chain(kind):
    alpha, c = 0.7, torch.tensor([1.0, -0.5])
    sched = (DiffusionSchedule(ddim(set_alpha_to_one=False), 4, 0.8) if kind == "ddim"
             else FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 6, 0.8))
    torch.manual_seed(0)
    model = _AffineDenoiser(sched.timesteps)
    with torch.no_grad():
        model.net.weight.mul_(0.5)
    add_lora_control(model, rank=2, target_modules=["shift"])
    s = ControlledSampler(model, sched)
    K = len(sched)
    # pretrained chain is affine: J_k = d mu_pre / dx is constant, so the optimal control is constant per step
    eye = torch.eye(2)
    J = [torch.autograd.functional.jacobian(lambda x, k=k: s.mean(x[None], k, controlled=False)[0], torch.zeros(2))
         for k in range(K)]
    a = [None] * (K + 1)
    a[K] = c
    for k in reversed(range(K)):
        a[k] = J[k].T @ a[k + 1]
    optimum = [float(sched.std[k]) ** 2 * a[k + 1] / alpha for k in range(K)]  # 0 on deterministic steps
    stochastic = [k for k in range(K) if sched.is_stochastic(k)]
    assert stochastic == list(range(K - 2))  # the jump into the grid's floor (t = 0; s = 0.0089), then its last step
    _set_control(model, s, optimum)

    x_T = torch.randn(16, 2)
    traj = s.rollout(x_T, torch.Generator().manual_seed(0))
    grad = c.expand(16, 2)
    params = lora_parameters(model)
    for p in params:
        p.grad = None
    loss = adjoint_matching_backward(s, traj, grad, alpha, 1.0 / 16)
    assert float(loss.abs().max()) < 1e-20
    assert max(float(p.grad.abs().max()) for p in params) < 1e-12
    for p in params:  # any per-step weighting has the same minimiser
        p.grad = None
    adjoint_matching_backward(s, traj, grad, alpha, 1.0 / 16, step_weight_power=1.0)
    assert max(float(p.grad.abs().max()) for p in params) < 1e-12
    # the exact per-step KL is that of the optimal control
    kl_ref = sum(float((optimum[k] ** 2).sum()) / (2 * float(sched.std[k]) ** 2) for k in stochastic)
    torch.testing.assert_close(traj.kl, torch.full((16,), kl_ref))
    # and the fine-tuned chain samples the tilted law: its mean shifts by Cov(x_K | x_T) c / alpha
    cov = torch.zeros(2, 2)
    for k in range(K):
        cov = J[k] @ cov @ J[k].T + float(sched.std[k]) ** 2 * eye
    x_ft, x_pre = x_T.clone(), x_T.clone()
    for k in range(K):
        x_ft, x_pre = s.mean(x_ft, k, controlled=True), s.mean(x_pre, k, controlled=False)
    torch.testing.assert_close(x_ft - x_pre, (cov @ c / alpha).expand(16, 2))

    # away from the optimum the gradient does not vanish, and plain gradient descent on the regression
    # converges back to the optimum
    with torch.no_grad():  # back to peft's initialisation: zero control, lora_B = 0, lora_A random
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
            elif "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    traj = s.rollout(x_T, torch.Generator().manual_seed(0))
    for p in params:
        p.grad = None
    adjoint_matching_backward(s, traj, grad, alpha, 1.0 / 16)
    assert max(float(p.grad.abs().max()) for p in params) > 1e-2
    plain = [p.grad.clone() for p in params]
    for p in params:  # the weighting changes the gradient away from the optimum, not the reported loss
        p.grad = None
    reweighted = adjoint_matching_backward(s, traj, grad, alpha, 1.0 / 16, step_weight_power=1.0)
    torch.testing.assert_close(reweighted, adjoint_matching_backward(s, traj, grad, alpha, 0.0))
    assert max(float((p.grad - g).abs().max()) for p, g in zip(params, plain)) > 1e-3
    opt = torch.optim.Adam(params, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        traj = s.rollout(torch.randn(32, 2, generator=gen), gen)
        opt.zero_grad()
        adjoint_matching_backward(s, traj, c.expand(32, 2), alpha, 1.0 / 32)
        opt.step()
    x_ft = x_T.clone()
    for k in range(K):
        x_ft = s.mean(x_ft, k, controlled=True)
    torch.testing.assert_close(x_ft - x_pre, (cov @ c / alpha).expand(16, 2), atol=1e-2, rtol=1e-2)


def test_config_validates_drift_objective():
    with pytest.raises(ValueError, match=r"ElegantConfig\.drift_objective"):
        ElegantConfig(drift_objective="reinforce")
    with pytest.raises(ValueError, match=r"ElegantConfig\.truncate_backprop_steps"):
        ElegantConfig(drift_objective="adjoint_matching", truncate_backprop_steps=3)
    assert ElegantConfig().drift_objective == "auto"


def _affine_chain(alpha_bar_one=False, steps=4, eta=0.8, weight_scale=0.5):
    sched = DiffusionSchedule(ddim(set_alpha_to_one=alpha_bar_one), steps, eta)
    torch.manual_seed(0)
    model = _AffineDenoiser(sched.timesteps)
    with torch.no_grad():
        model.net.weight.mul_(weight_scale)
    add_lora_control(model, rank=2, target_modules=["shift"])
    s = ControlledSampler(model, sched)
    J = [torch.autograd.functional.jacobian(lambda x, k=k: s.mean(x[None], k, controlled=False)[0], torch.zeros(2))
         for k in range(steps)]
    return s, model, J


def _controlled_affine_chain(steps=4):
    """``(sampler, model, c, K, exact value gradients a[k], a rollout)`` of an affine chain with a random control."""
    s, model, J = _affine_chain(steps=steps)
    c, K = torch.tensor([0.4, 0.3]), len(s.schedule)
    a = [c]
    for k in reversed(range(K)):
        a.insert(0, J[k].T @ a[0])  # grad V_k = (J_k ... J_{K-1})^T c, constant for an affine chain
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return s, model, c, K, a, s.rollout(torch.randn(8, 2), torch.Generator().manual_seed(0))


def test_value_guided_target_with_exact_values_equals_lean_adjoint_target():
    s, model, c, K, a, traj = _controlled_affine_chain()
    params = lora_parameters(model)
    results = []
    for vg in (None, lambda x, k: a[k].expand_as(x)):
        for p in params:
            p.grad = None
        loss = adjoint_matching_backward(s, traj, c.expand(8, 2), 0.5, 1.0 / 8, value_gradient=vg)
        results.append((loss, [p.grad.clone() for p in params], traj.kl.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][2], results[1][2])
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1)
    assert float(results[0][0].min()) > 0


def test_seiko_and_processes_without_step_values_reject_value_guided_drift():
    from hf_control_ft import ControlledProcess, SeikoConfig

    with pytest.raises(ValueError, match="SeikoConfig.drift_objective"):
        SeikoConfig(drift_objective="value_guided")

    class NoStepValues(ControlledProcess):
        family = "custom"
        supports_step_values = False

    config = ElegantConfig(drift_objective="value_guided", report_to=None)
    process = NoStepValues(make_mlp_denoiser(lora=False), ddim(), (2,), config)
    with pytest.raises(ValueError, match="the custom process does not offer per-step values"):
        ElegantTrainer(config, reward_fn=_reward, process=process)


@pytest.mark.parametrize("kept", [None, 2])
def test_step_values_fit_the_exact_value_gradient_of_a_gaussian_random_walk_from_all_or_some_steps(kept):
    """Rollouts x_{k+1} = x_k + 0.5 xi_k, r = c . x_K: V_k(x) = c . x + const_k, so grad V_k = c at every step;
    keeping 2 random steps of each rollout (``select_states``) instead of all 5 gives the same values."""
    K, N, alpha, c = 5, 4096, 1.0, torch.tensor([0.5, -0.3])
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(N, 2, generator=gen)]
    for _ in range(K):
        states.append(states[-1] + 0.5 * torch.randn(N, 2, generator=gen))
    torch.manual_seed(0)
    values = StepValueFunction((2,), alpha, torch.linspace(0.9, 0.1, K), hidden=32, depth=2)
    if kept is None:
        values.fit(states[:K], states[K] @ c, steps=400, lr=3e-3, batch_size=512, generator=gen, progress=False)
    else:
        x, steps = select_states(states[:K], kept, torch.Generator().manual_seed(1))
        assert x.shape == (N, kept, 2) and steps.shape == (N, kept)
        assert all(len(set(row.tolist())) == kept for row in steps[:100])  # distinct steps per rollout
        assert torch.equal(x[7, 1], states[int(steps[7, 1])][7])
        assert torch.bincount(steps.flatten(), minlength=K).min() > 0.18 * N * kept  # every step represented
        values.fit(x, states[K] @ c, steps=400, lr=3e-3, batch_size=512, generator=gen, progress=False,
                   step_index=steps)
    for k in range(K):
        g = values.gradient(states[k][:512], k)
        err = (g - c).norm(dim=1).mean() / c.norm()
        assert err < 0.15, (k, float(err), g.mean(0))



@pytest.mark.parametrize("with_values", [False, True])
def test_timestep_subsampling_is_unbiased_and_skips_the_untrained_steps(with_values):
    """Each single-step subset, weighted n, averaged over the n stochastic steps, gives the full sweep's gradient,
    loss and path KL exactly; with per-step values an untrained step costs no network pass."""
    s, model, c, K, a, traj = _controlled_affine_chain(steps=5)
    vg = (lambda x, k: a[k].expand_as(x)) if with_values else None
    params = lora_parameters(model)
    stochastic = [k for k in range(K) if s.schedule.is_stochastic(k)]
    assert len(stochastic) >= 3

    def sweep(train_steps):
        for p in params:
            p.grad = None
        loss = adjoint_matching_backward(s, traj, c.expand(8, 2), 0.5, 1.0 / 8, value_gradient=vg,
                                         train_steps=train_steps)
        return loss, torch.cat([p.grad.flatten() for p in params]), traj.kl.clone()

    full = sweep(None)
    parts = [sweep([k]) for k in stochastic]
    for i in range(3):
        torch.testing.assert_close(sum(p[i] for p in parts) / len(parts), full[i])
    assert not torch.allclose(parts[0][1], full[1])  # one step alone is not the full gradient

    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    sweep([stochastic[0]])
    hook.remove()
    # the trained step: a fine-tuned and a pretrained pass; the lean adjoint adds a pretrained pass at every other step
    assert len(calls) == (2 if with_values else K + 1)


def test_train_timestep_fraction_is_checked_and_needs_a_regression_objective():
    with pytest.raises(ValueError, match=r"ElegantConfig\.train_timestep_fraction.*in \(0, 1\]"):
        ElegantConfig(drift_objective="value_guided", train_timestep_fraction=0)
    with pytest.raises(ValueError, match=r"ElegantConfig\.train_timestep_fraction.*value_guided"):
        ElegantConfig(drift_objective="pathwise", train_timestep_fraction=0.5)
    assert ElegantConfig(drift_objective="adjoint_matching", train_timestep_fraction=0.25).train_timestep_fraction == 0.25
