"""Flow-matching transitions (docs/algorithms.md §11): closed-form mean, std and KL; the pretrained chain keeps
the data law; ELEGANT's generic constructor on a FlowMatchEulerDiscreteScheduler."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from hf_control_ft import ControlledSampler, ElegantConfig, ElegantTrainer, gaussian_kl
from hf_control_ft.core.control import pretrained_mode
from hf_control_ft.core.flow_matching import FlowMatchSchedule, build_schedule, memoryless_eta
from hf_control_ft.core.scheduling import DiffusionSchedule
from hf_control_ft.tasks.gaussian_mixture import GaussianMixture, exact_velocity, three_mode_mixture
from hf_control_ft.testing import make_mlp_denoiser, scale_lora


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_mean_std_and_kl_are_the_closed_forms_of_the_flow_sde(shift):
    eta, K = 0.5, 10
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = FlowMatchSchedule(sched, K, eta)
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(K)
    torch.testing.assert_close(schedule.timesteps, ref.timesteps.float())  # what diffusers feeds the model
    assert len(sched.timesteps) == 1000  # the caller's scheduler is untouched (no set_timesteps on it)
    g = torch.Generator().manual_seed(0)
    x, v1, v2 = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    for k in range(K):
        s, s_next = float(ref.sigmas[k]), float(ref.sigmas[k + 1])
        ds = s_next - s
        at = s_next if k == 0 else s  # the first step (s = 1) takes the noise level of its end
        assert k != 0 or s == 1.0
        sigma = eta * math.sqrt(2 * at / (1 - at))
        expected = x + ds * (v1 + sigma**2 / (2 * s) * (x + (1 - s) * v1))
        torch.testing.assert_close(schedule.mean(v1, x, k), expected)
        assert float(schedule.std[k]) == pytest.approx(sigma * math.sqrt(-ds), rel=1e-12)
        kl = gaussian_kl(schedule.mean(v1, x, k), schedule.mean(v2, x, k), schedule.std[k])
        closed = -ds * (1 + sigma**2 * (1 - s) / (2 * s)) ** 2 * (v1 - v2).pow(2).sum(1) / (2 * sigma**2)
        torch.testing.assert_close(kl, closed)  # summed over dimensions, with the |ds| factor
        assert schedule.kl_factor(k) == pytest.approx(float(closed[0] / (v1 - v2)[0].pow(2).sum()), rel=1e-10)
    assert all(schedule.is_stochastic(k) for k in range(K))
    x0, eps = schedule.predict_x0_eps(v1, x, 3)
    s3 = float(schedule.levels[3])
    torch.testing.assert_close(x0, x - s3 * v1)
    torch.testing.assert_close(eps, x + (1 - s3) * v1)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_pretrained_flow_sde_with_the_exact_velocity_keeps_the_data_law(eta):
    """Gaussian data: the chain's sample mean and covariance match the data's (the SDE has the flow's marginals)."""
    m = GaussianMixture([1.0], [[1.0, -2.0]], [[[0.5, 0.2], [0.2, 0.3]]])
    schedule = FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 40, eta)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40000, 2, generator=g)
    for k in range(len(schedule)):
        v = exact_velocity(m, x, schedule.levels[k].float().expand(len(x)))
        x = schedule.step(v, x, k, torch.randn(x.shape, generator=g))
    assert torch.allclose(x.mean(0).double(), m.means[0], atol=0.03)
    assert torch.allclose(torch.cov(x.T).double(), m.covariances[0], atol=0.03)


def test_pretrained_flow_sde_keeps_the_mixture_mode_weights():
    mixture = three_mode_mixture()
    schedule = FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(), 30, 0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 2, generator=g)
    for k in range(len(schedule)):
        x = schedule.step(exact_velocity(mixture, x, schedule.levels[k].float().expand(len(x))), x, k,
                          torch.randn(x.shape, generator=g))
    assert mixture.mode_weight_tv(x) < 0.015
    assert max(mixture.mode_mean_errors(x)) < 0.1


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="eta must be in"):
        FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(), 10, 0.0)
    with pytest.raises(ValueError, match="eta must be in"):
        FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(), 10, 1.5)
    with pytest.raises(ValueError, match="pass mu"):
        FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 10, 1.0)
    with pytest.raises(ValueError, match="invert_sigmas"):
        FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(invert_sigmas=True), 10, 1.0)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 10, 1.0)
    shifted = FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 10, 1.0, mu=1.15)
    plain = FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(), 10, 1.0)
    assert float(shifted.levels[5]) > float(plain.levels[5])  # mu shifts toward noise
    assert isinstance(build_schedule(DDIMScheduler(), 10, 0.5), DiffusionSchedule)
    assert isinstance(build_schedule(FlowMatchEulerDiscreteScheduler(), 10, 0.5), FlowMatchSchedule)
    assert memoryless_eta(0.7) == pytest.approx(0.495, abs=1e-3)
    with pytest.raises(TypeError, match="DDPMScheduler or DDIMScheduler"):
        DiffusionSchedule(FlowMatchEulerDiscreteScheduler(), 10, 1.0)


def test_sampler_kl_on_a_flow_schedule_is_the_sum_of_the_closed_forms():
    model = make_mlp_denoiser(dim=2, perturb=0.0)
    scale_lora(model, 0.3, seed=2)
    schedule = FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(), 6, 0.7)
    sampler = ControlledSampler(model, schedule)
    g = torch.Generator().manual_seed(0)
    traj = sampler.rollout(torch.randn(5, 2, generator=g), g, measure_kl=True)
    expected = torch.zeros(5)
    for k in range(len(schedule)):
        with torch.no_grad():
            v_ft = sampler.predict(traj.states[k], k)
            with pretrained_mode(model):
                v_pre = sampler.predict(traj.states[k], k)
        expected += schedule.kl_factor(k) * (v_ft - v_pre).pow(2).sum(1)
    torch.testing.assert_close(traj.kl, expected, rtol=1e-4, atol=1e-6)
    assert float(traj.kl.min()) > 0


def test_elegant_generic_constructor_trains_a_velocity_model_on_a_flow_scheduler():
    """ElegantTrainer(config, model=velocity_model, scheduler=FlowMatchEulerDiscreteScheduler(...)): the reward
    rises, the KL is finite and positive, the model is called with timestep = s * 1000."""
    seen = []
    model = make_mlp_denoiser(dim=2, lora=False)
    original = model.forward

    def recording(sample, timestep, **kw):
        seen.append(torch.as_tensor(timestep).flatten()[0].item())
        return original(sample, timestep, **kw)

    model.forward = recording
    cfg = ElegantConfig(eta=0.5, num_inference_steps=8, train_steps=25, batch_size=32, learning_rate=1e-2,
                        value_num_rollouts=64, value_train_steps=20, noise_train_steps=10, report_to=None, alpha=0.3,
                        drift_objective="pathwise")

    def reward(x):
        return x[:, 0]

    trainer = ElegantTrainer(cfg, model, FlowMatchEulerDiscreteScheduler(shift=3.0), reward, (2,))
    before = reward(trainer.sample(512, torch.Generator().manual_seed(0), controlled=False)).mean()
    summary = trainer.train()
    after = reward(trainer.sample(512, torch.Generator().manual_seed(0))).mean()
    assert after > before + 0.1
    assert 0 < summary["train/kl"] < 50
    assert max(seen) == pytest.approx(1000.0) and min(seen) > 0  # s = 1 first, s > 0 always
    assert type(trainer.schedule).__name__ == "FlowMatchSchedule"


@pytest.mark.slow
def test_elegant_on_the_flow_sde_moves_mode_weights_to_the_exact_tilted_target():
    """The check of ``benchmarks/tilted_target.py --flow``, smaller: eta = 0.5 (the GRPO-style noise level),
    20 steps, 60 value-guided iterations; learned initial noise."""
    from hf_control_ft.tasks.gaussian_mixture import distill_flow_velocity

    mixture = three_mode_mixture()
    c = torch.tensor([0.5, 0.3])
    target = mixture.tilted_linear(c, 2.0)
    velocity = distill_flow_velocity(mixture, steps=400, hidden=64, depth=2)
    cfg = ElegantConfig(alpha=2.0, eta=0.5, num_inference_steps=20, train_steps=60, batch_size=64,
                        learning_rate=2e-3, value_num_rollouts=2048, value_train_steps=300, noise_train_steps=150,
                        noise_num_steps=10, aux_hidden=64, drift_objective="value_guided",
                        step_value_train_steps=500, report_to=None)
    trainer = ElegantTrainer(cfg, velocity, FlowMatchEulerDiscreteScheduler(), lambda x: x @ c, (2,))
    tv_pre = target.mode_weight_tv(trainer.sample(4096, torch.Generator().manual_seed(0), 1024, controlled=False))
    assert tv_pre > 0.28
    summary = trainer.train()
    assert summary["train/kl"] > 0
    tv = target.mode_weight_tv(trainer.sample(4096, torch.Generator().manual_seed(1), 1024))
    assert tv < 0.4 * tv_pre, (tv_pre, tv)  # measured 0.319 -> 0.065
