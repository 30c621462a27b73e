import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from hf_control_ft.core.kl import gaussian_kl, gaussian_log_prob
from hf_control_ft.core.scheduling import DiffusionSchedule


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_mean_and_std_match_scheduler_step(eta, prediction_type, clip):
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip,
                          set_alpha_to_one=False)
    sch = DiffusionSchedule(sched, 10, eta)  # works on its own copy of the scheduler
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(sch.timesteps):
        x = torch.randn(3, 4, generator=g)
        out = torch.randn(3, 4, generator=g)
        noise = torch.randn(3, 4, generator=g)
        # the jump into t = 0 (t = 100 -> 0: the noise level shrinks to 0.10 of itself) runs as DDIM's eta = 0 step
        ref = sched.step(out, int(t), x, eta=0.0 if k == 8 else eta, variance_noise=noise).prev_sample
        ours = sch.step(out, x, k, noise)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # leading spacing ends at t = 0, whose "previous" alpha_bar is alpha_bar_0 itself: variance 0
    assert sch.random_steps() == list(range(8)) and sch.std[-1] == 0


def test_ddim_with_steps_offset_is_stochastic_but_for_the_jump_into_t_1():
    """SD's configs (steps_offset=1): the grid ends at t = 1, and the step into it shrinks the noise level to
    0.12-0.29 of itself at 10-50 steps, with a KL factor 10-40x the previous step's: deterministic; the last step
    (t = 1 -> alpha_bar_0) is random."""
    sched = DDIMScheduler(num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    for K in (10, 50):
        schedule = DiffusionSchedule(sched, K, 0.5)
        assert schedule.random_steps() == [k for k in range(K) if k != K - 2]
        assert int(schedule.timesteps[K - 1]) == 1


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_mean_and_std_match_scheduler_step(variance_type, prediction_type):
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, prediction_type=prediction_type)
    sch = DiffusionSchedule(sched, 8, 1.0)  # works on its own copy of the scheduler
    sched.set_timesteps(8)
    g = torch.Generator().manual_seed(1)
    for k, t in enumerate(sch.timesteps):
        x = torch.randn(2, 3, generator=g)
        out = torch.randn(2, 3, generator=g)
        gen_a, gen_b = torch.Generator().manual_seed(k), torch.Generator().manual_seed(k)
        ref = sched.step(out, int(t), x, generator=gen_a).prev_sample
        noise = torch.randn(2, 3, generator=gen_b)
        if k == 6:  # the jump t = 125 -> 0 runs as DDIM's eta = 0 step: sqrt(abar') x0 + sqrt(1 - abar') eps
            x0, eps = sch.predict_x0_eps(out, x, k)
            ap = float(sch.alpha_bar_prev[k])
            ref = ap**0.5 * x0 + (1 - ap) ** 0.5 * eps
        torch.testing.assert_close(sch.step(out, x, k, noise), ref, rtol=1e-5, atol=1e-5)
    assert sch.random_steps() == list(range(6))  # diffusers adds no noise at t = 0; the jump into it is ours


def test_eta_zero_and_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="eta = 0"):
        DiffusionSchedule(DDIMScheduler(), 10, 0.0)
    with pytest.raises(ValueError, match="eta must be in"):
        DiffusionSchedule(DDIMScheduler(), 10, 1.5)
    with pytest.raises(ValueError, match="fixed variance"):
        DiffusionSchedule(DDPMScheduler(), 10, 0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DiffusionSchedule(DDIMScheduler(), 0, 1.0)
    with pytest.raises(TypeError, match="DDPMScheduler or DDIMScheduler"):
        DiffusionSchedule(object(), 10, 1.0)


def test_gaussian_kl_and_log_prob_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mp, mq, x = (torch.randn(5, 3, 4, generator=g) for _ in range(3))
    std = 0.37
    ref_kl = torch.distributions.kl_divergence(torch.distributions.Normal(mp, std),
                                               torch.distributions.Normal(mq, std)).sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_kl(mp, mq, std), ref_kl)
    ref_lp = torch.distributions.Normal(mp, std).log_prob(x).sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, mp, std), ref_lp)
    assert torch.equal(gaussian_kl(mp, mp, std), torch.zeros(5))
    with pytest.raises(ValueError):
        gaussian_kl(mp, mq, 0.0)
