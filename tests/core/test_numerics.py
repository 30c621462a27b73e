"""Numerics on real-checkpoint settings: floored-variance steps, scheduler conversion, half-precision KL, stage 1
at small alpha, bounded optimism (docs/algorithms.md, "Real checkpoints")."""

import logging
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from hf_control_ft import ElegantConfig, ElegantTrainer, SeikoConfig
from hf_control_ft.core.control import pretrained_mode
from hf_control_ft.core.kl import gaussian_kl
from hf_control_ft.core.sampler import ControlledSampler
from hf_control_ft.core.scheduling import DiffusionSchedule, as_stochastic_scheduler
from hf_control_ft.models.reward_ensemble import OptimisticReward, RewardEnsemble
from hf_control_ft.models.step_values import StepValueFunction
from hf_control_ft.models.value_function import ValueFunction
from hf_control_ft.processes.stable_diffusion import StableDiffusionOptions
from hf_control_ft.testing import kl_and_gradient, make_mlp_denoiser, scale_lora, tiny_components, tiny_sd_pipeline

PROMPTS = ["a cat", "the dog"]
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ------------------------------------------------------------------------------ 1. floored-variance steps
def _scheduler(kind, steps_offset, spacing):
    if kind == "ddpm":
        return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=steps_offset,
                             timestep_spacing=spacing, **SD_BETAS)
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=steps_offset,
                         timestep_spacing=spacing, set_alpha_to_one=True, **SD_BETAS)


CASES = [(kind, offset, spacing) for kind in ("ddpm", "ddim") for offset in (0, 1)
         for spacing in ("leading", "trailing", "linspace")]


@pytest.mark.parametrize("kind,steps_offset,spacing", CASES)
def test_transitions_match_scheduler_step_and_floored_steps_are_deterministic(kind, steps_offset, spacing):
    sched = _scheduler(kind, steps_offset, spacing)
    eta = 1.0 if kind == "ddpm" else 0.6
    schedule = DiffusionSchedule(sched, 20, eta)
    assert sched.num_inference_steps is None  # the caller's scheduler is not touched
    ref = _scheduler(kind, steps_offset, spacing)
    ref.set_timesteps(20)
    assert torch.equal(schedule.timesteps, ref.timesteps.long())
    g = torch.Generator().manual_seed(0)
    jumps = []
    for k, t in enumerate(schedule.timesteps.tolist()):
        x, out = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
        noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(k))
        if kind == "ddpm":
            expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
            floored = t > 0 and float(ref._get_variance(t)) <= 1e-20
            deterministic = t == 0 or floored
        else:
            expected = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
            deterministic = float(ref._get_variance(t, t - 1000 // 20)) <= 1e-20
        # a jump into low noise (the noise level shrinks below 0.45 of itself, ending under 0.5) runs as DDIM's
        # eta = 0 step: no noise, the marginals kept (docs/algorithms.md §7)
        level = (1 - float(schedule.alpha_bar[k])) ** 0.5
        level_next = (1 - float(schedule.alpha_bar_prev[k])) ** 0.5
        if not deterministic and level_next < 0.5 and level_next < 0.45 * level:
            jumps.append(k)
            deterministic = True
            x0, eps = schedule.predict_x0_eps(out, x, k)
            a = float(schedule.alpha_bar_prev[k])
            expected = a**0.5 * x0 + (1 - a) ** 0.5 * eps
        torch.testing.assert_close(schedule.step(out, x, k, noise), expected, rtol=1e-5, atol=1e-5)
        # a floored variance (diffusers adds 1e-10 * noise) is a deterministic step, never a tiny sigma
        assert (float(schedule.std[k]) == 0) == deterministic
        assert float(schedule.std[k]) == 0 or float(schedule.std[k]) > 1e-4
    if kind == "ddpm" and (steps_offset == 1 or spacing == "trailing"):
        assert not schedule.is_stochastic(len(schedule) - 1)  # the SD-config case of the issue
    # one jump, into the grid's end (t = 0 / 1); trailing grids end at t = 49, whose last step is deterministic anyway
    assert jumps == ([] if spacing == "trailing" else [len(schedule) - 2])


@pytest.mark.parametrize("kind,steps_offset,spacing", CASES)
def test_path_kl_of_a_small_control_is_finite_and_the_closed_form(kind, steps_offset, spacing):
    model = make_mlp_denoiser(perturb=0.005)
    schedule = DiffusionSchedule(_scheduler(kind, steps_offset, spacing), 20, 1.0 if kind == "ddpm" else 0.6)
    sampler = ControlledSampler(model, schedule)
    traj = sampler.rollout(torch.randn(64, 2, generator=torch.Generator().manual_seed(1)),
                           torch.Generator().manual_seed(2), measure_kl=True)
    expected = torch.zeros(64)
    with torch.no_grad():
        for k in range(len(schedule)):
            if float(schedule.std[k]) == 0:
                continue
            x, t = traj.states[k], schedule.timesteps[k].expand(64)
            mu_ft = schedule.mean(model(x, t).sample, x, k)
            with pretrained_mode(model):
                mu_pre = schedule.mean(model(x, t).sample, x, k)
            expected += gaussian_kl(mu_ft, mu_pre, float(schedule.std[k]))
    assert torch.isfinite(traj.kl).all() and float(traj.kl.mean()) < 10  # was 3e8 / 4e10 before the fix
    assert float(traj.kl.mean()) > 0
    torch.testing.assert_close(traj.kl, expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ 2. scheduler conversion
def test_conversion_keeps_the_noise_schedule_and_never_clips(caplog):
    pndm = PNDMScheduler(num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
                         **SD_BETAS)
    assert "clip_sample" not in pndm.config  # DDIM's default (True) would clamp SD latents to +-1
    with caplog.at_level(logging.INFO, logger="hf_control_ft.core.scheduling"):
        ddim = as_stochastic_scheduler(pndm)
    assert isinstance(ddim, DDIMScheduler) and type(pndm) is PNDMScheduler
    assert ddim.config.clip_sample is False and ddim.config.thresholding is False
    assert ddim.config.steps_offset == 1 and ddim.config.set_alpha_to_one is False
    torch.testing.assert_close(ddim.alphas_cumprod, pndm.alphas_cumprod)
    assert "converted PNDMScheduler to DDIMScheduler" in caplog.text and "inherited" in caplog.text
    own = DDIMScheduler(clip_sample=False)
    copy = as_stochastic_scheduler(own)
    assert copy is not own and dict(copy.config) == dict(own.config)


def test_unsupported_schedulers_pipelines_and_options_are_refused():
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler is not supported"):
        as_stochastic_scheduler(FlowMatchEulerDiscreteScheduler())
    cfg = ElegantConfig(num_inference_steps=2, report_to=None, learn_initial_noise=False)
    pipe = tiny_sd_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        ElegantTrainer.from_pipeline(pipe, None, cfg, prompts=PROMPTS)
    with pytest.raises(ValueError, match="guidance_rescale"):
        ElegantTrainer.from_pipeline(tiny_sd_pipeline(), None, cfg, prompts=PROMPTS, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="kl_precision"):
        StableDiffusionOptions(kl_precision="half")
    c = tiny_components()
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(c["tokenizer"]), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=32))
    xl = StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=encoder_2,
                                   tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer"], unet=c["unet"],
                                   scheduler=c["scheduler"])
    with pytest.raises(ValueError, match="no .text_time. added conditioning"):
        ElegantTrainer.from_pipeline(xl, None, cfg, prompts=PROMPTS)


def test_zero_terminal_snr_with_epsilon_prediction_is_refused():
    zsnr = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DiffusionSchedule(DDIMScheduler(prediction_type="epsilon", **zsnr), 10, 1.0)
    schedule = DiffusionSchedule(DDIMScheduler(prediction_type="v_prediction", **zsnr), 10, 1.0)
    x0, eps = schedule.predict_x0_eps(torch.randn(2, 3), torch.randn(2, 3), 0)
    assert torch.isfinite(x0).all() and torch.isfinite(eps).all()


# ------------------------------------------------------------------------------ 3. half-precision KL
def _kl_grad(mixed, kl_precision, scale, guidance=7.5):
    cfg = ElegantConfig(alpha=1.0, eta=1.0, num_inference_steps=6, learn_initial_noise=False, batch_size=2,
                        report_to=None, lora_rank=4, gradient_checkpointing=False)
    trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), None, cfg, prompts=PROMPTS, guidance_scale=guidance,
                                           mixed_precision=mixed, kl_precision=kl_precision)
    scale_lora(trainer.process.lora_model, scale)
    return kl_and_gradient(trainer)


@pytest.mark.parametrize("mixed", ["bf16", "fp16"])
def test_half_precision_kl_and_gradient_match_fp32(mixed):
    for scale in (1e-2, 1e-1):
        kl32, grad32 = _kl_grad("no", "fp32", scale)
        kl, grad = _kl_grad(mixed, "fp32", scale)
        assert kl32 >= 0.1  # the operating range of the goal
        assert abs(kl / kl32 - 1) < 0.1 and abs(grad / grad32 - 1) < 0.1, (scale, kl, kl32, grad, grad32)


def test_half_precision_autocast_kl_has_the_documented_floor():
    # why kl_precision="fp32" is the default: all-bf16 KL passes give a floor far above a small control's KL
    kl32, _ = _kl_grad("no", "fp32", 1e-3)
    kl_precise, _ = _kl_grad("bf16", "fp32", 1e-3)
    kl_autocast, _ = _kl_grad("bf16", "autocast", 1e-3)
    assert abs(kl_precise / kl32 - 1) < 0.1
    assert kl_autocast > 10 * kl32


# ------------------------------------------------------------------------------ 4. values at small alpha
def _slope(values, x):
    design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    return torch.linalg.lstsq(design, values[:, None]).solution[:, 0]


@pytest.mark.parametrize("spread_over_alpha", [1, 10, 100])
def test_stage1_value_slope_at_small_alpha(spread_over_alpha):
    # x_0 = x_T + N(0, s^2), r = x_0[0]: v_T(x) = x[0] + s^2 / (2 alpha), slope exactly (1, 0)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4096, 2, generator=g)
    r = x_T[:, 0] + 0.1 * torch.randn(4096, generator=g)
    alpha = float(r.std()) / spread_over_alpha
    torch.manual_seed(1)
    vf = ValueFunction((2,), alpha, hidden=64, depth=2)
    vf.fit(x_T, r, steps=500, generator=torch.Generator().manual_seed(2), progress=False)
    probe = torch.randn(2000, 2, generator=g)
    with torch.no_grad():
        coef = _slope(vf(probe), probe)
    assert abs(float(coef[0]) - 1) < 0.1 and abs(float(coef[1])) < 0.1, coef


@pytest.mark.parametrize("spread_over_alpha", [1, 10, 100])
def test_step_value_slopes_at_small_alpha(spread_over_alpha):
    # random walk x_{k+1} = x_k + 0.03 xi over K = 4 steps, r = x_K[0]: V_k(x) = x[0] + const, slope 1 at every k
    g = torch.Generator().manual_seed(0)
    K, N = 4, 4096
    states = [torch.randn(N, 2, generator=g)]
    for _ in range(K):
        states.append(states[-1] + 0.03 * torch.randn(N, 2, generator=g))
    r = states[-1][:, 0]
    alpha = float(r.std()) / spread_over_alpha
    torch.manual_seed(1)
    sv = StepValueFunction((2,), alpha, torch.linspace(0.9, 0.1, K), hidden=64, depth=2)
    sv.fit(states[:K], r, steps=800, generator=torch.Generator().manual_seed(2), progress=False)
    probe = torch.randn(2000, 2, generator=g)
    for k in range(K):
        with torch.no_grad():
            coef = _slope(sv(probe, k), probe)
        assert abs(float(coef[0]) - 1) < 0.1 and abs(float(coef[1])) < 0.1, (k, coef)


def test_flat_value_fit_is_warned_about(caplog):
    from hf_control_ft.models.value_function import check_value_range

    r = torch.linspace(-1, 1, 100)
    with caplog.at_level(logging.WARNING, logger="hf_control_ft.models.value_function"):
        assert check_value_range(torch.zeros(100), r, alpha=0.01, name="stage 1 value v_T")
        assert not check_value_range(r.clone(), r, alpha=0.01, name="ok")
        assert not check_value_range(torch.zeros(100), r, alpha=10.0, name="alpha large")  # r / alpha < 1
    assert "nearly flat" in caplog.text and "stage 1 value v_T" in caplog.text


# ------------------------------------------------------------------------------ 5. bounded optimism
def _fitted_ensemble(bootstrap, feature_std_floor=0.1, constant_feature=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    if constant_feature:
        x[:, 2] = 1e-8 * torch.randn(200, generator=g)  # e.g. an image border pixel
    y = torch.sin(2 * x[:, 0]) + x[:, 1] ** 2 + 0.05 * torch.randn(200, generator=g)
    ens = RewardEnsemble((3,), ensemble_size=3, hidden=16, feature_std_floor=feature_std_floor)
    ens.fit(x, y, bootstrap=bootstrap, steps=200, generator=torch.Generator().manual_seed(0))
    ens.fit_gram(x)
    return ens, x


@pytest.mark.parametrize("kind", ["ucb", "bootstrap"])
def test_bonus_is_capped_off_the_data_and_unchanged_on_it(kind):
    ens, x = _fitted_ensemble(kind == "bootstrap")
    tau = 0.5  # alpha + beta
    capped = OptimisticReward(ens, kind, bonus_scale=1.0, temperature=tau)  # default cap: 3 nats = 3 tau
    raw = OptimisticReward(ens, kind, bonus_scale=1.0, bonus_cap=None, temperature=tau)
    direction = torch.nn.functional.normalize(torch.randn(16, 3, generator=torch.Generator().manual_seed(3)), dim=1)
    cap = 3.0 * tau
    with torch.no_grad():
        on_raw, on_capped = raw.parts(x)[1], capped.parts(x)[1]
        far_raw = raw.parts(100 * direction)[1]
        for radius in (10, 100, 1e4):
            assert float(capped.parts(radius * direction)[1].max()) <= cap * (1 + 1e-6)
    assert float(far_raw.mean()) > 5 * float(on_raw.mean())  # the unbounded growth the cap removes
    assert float(on_raw.mean()) < 0.5 * cap
    # tanh(g / m) ~ g / m where the bonus is small against the cap: most of the data
    small = on_raw < 0.3 * cap
    assert float(small.float().mean()) > 0.8
    torch.testing.assert_close(on_capped[small], on_raw[small], rtol=0.05, atol=1e-4)
    assert abs(float(on_capped.mean()) / float(on_raw.mean()) - 1) < 0.1
    probe = (100 * direction).requires_grad_(True)
    (grad,) = torch.autograd.grad(capped(probe).sum(), probe)
    assert torch.isfinite(grad).all()


def test_feature_std_floor_bounds_the_bonus_of_a_nearly_constant_feature():
    shift = torch.tensor([0.0, 0.0, 0.01])
    widths = {}
    for floor in (0.0, 0.1):
        ens, x = _fitted_ensemble(False, feature_std_floor=floor, constant_feature=True)
        with torch.no_grad():
            widths[floor] = (float(ens.ucb_width(x[:32]).mean()), float(ens.ucb_width(x[:32] + shift).mean()))
    on_data, shifted = widths[0.1]
    assert shifted < 3 * on_data  # a 0.01 shift of a constant pixel barely changes the bonus
    assert widths[0.0][1] > 30 * widths[0.0][0]  # without the floor it explodes (standardised by 1e-8)


@pytest.mark.parametrize("kw,field", [(dict(bonus_cap=0), "bonus_cap"), (dict(bonus_cap=math.inf), "bonus_cap"),
                                      (dict(bonus_cap="big"), "bonus_cap"), (dict(feature_std_floor=1.5),
                                                                             "feature_std_floor")])
def test_seiko_config_validates_the_optimism_bounds(kw, field, tmp_path):
    with pytest.raises(ValueError, match=f"SeikoConfig.{field}"):
        SeikoConfig(output_dir=str(tmp_path), report_to=None, **kw)
