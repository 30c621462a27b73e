"""ELEGANT and SEIKO on a tiny random Wan text-to-video pipeline (3-D transformer, causal video VAE, T5 prompts,
classifier-free guidance): the pipeline's velocity and decoded frames, a UniPC checkpoint's noise levels, the per-step
KL, stock reload, library reload, a SEIKO round with a video oracle."""

import pytest
import torch
from family_checks import (
    assert_step_kls_are_closed_form,
    run_one_seiko_round,
    tiny_config,
    train_save_and_reload,
)

from hf_control_ft import ElegantTrainer
from hf_control_ft.processes import WanProcess
from hf_control_ft.testing.families import tiny_wan_output, tiny_wan_pipeline

PROMPTS = ["a red cat", "the blue sea", "a dog"]
OPTIONS = dict(guidance_scale=5.0, max_sequence_length=16, height=32, width=32, num_frames=5,
               base_model="tiny/wan-random")


def red_video(videos, prompts):
    """Redness averaged over frames: ``(B, F, 3, H, W) -> (B,)``."""
    assert videos.dim() == 5 and len(prompts) == videos.shape[0]
    return (videos[:, :, 0] - videos[:, :, 1:].mean(2)).mean(dim=(1, 2, 3))


def test_wan_network_and_decoded_video_are_the_pipelines():
    pipe = tiny_wan_pipeline()
    trainer = ElegantTrainer.from_pipeline(pipe, red_video, tiny_config(num_inference_steps=3), PROMPTS, **OPTIONS)
    process = trainer.process
    assert isinstance(process, WanProcess) and trainer.sample_shape == (16, 2, 4, 4)
    assert process.condition_dim == 32 and process.model.do_guidance
    x = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    process.set_conditions(PROMPTS[:2])
    with torch.no_grad():
        v = process.model(x, trainer.schedule.timestep(0).expand(2))
        video = process.decode(x - v)
    expected = pipe(PROMPTS[:2], negative_prompt="", height=32, width=32, num_frames=5, num_inference_steps=1,
                    guidance_scale=5.0, max_sequence_length=16, latents=x.clone(), output_type="pt").frames
    assert video.shape == (2, 5, 3, 32, 32)
    torch.testing.assert_close(video, expected, rtol=1e-4, atol=1e-4)


def test_wan_samples_a_unipc_checkpoint_on_its_flow_noise_levels():
    from diffusers import UniPCMultistepScheduler

    pipe = tiny_wan_pipeline()
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    trainer = ElegantTrainer.from_pipeline(pipe, red_video, tiny_config(num_inference_steps=10), PROMPTS, **OPTIONS)
    pipe.scheduler.set_timesteps(10)
    levels = trainer.schedule.levels.float()
    assert float(trainer.schedule.next_levels[-1]) == 0.0
    torch.testing.assert_close(levels, pipe.scheduler.sigmas[:-1].float(), atol=2e-6, rtol=0)  # the solver's grid


def test_wan_trains_and_reloads_in_stock_diffusers(tmp_path):
    trainer = ElegantTrainer.from_pipeline(tiny_wan_pipeline(), red_video, tiny_config(), PROMPTS, **OPTIONS)
    card = train_save_and_reload(trainer, tiny_wan_pipeline, tiny_wan_output, lambda p: p.transformer,
                                 tmp_path / "wan", PROMPTS[:2])
    assert "| model family | wan |" in card and "flow-matching" in card


def test_wan_per_step_kl_is_the_closed_form():
    trainer = ElegantTrainer.from_pipeline(tiny_wan_pipeline(), red_video, tiny_config(), PROMPTS, **OPTIONS)
    assert_step_kls_are_closed_form(trainer, PROMPTS[:2])


@pytest.mark.slow
def test_seiko_round_on_wan(tmp_path):
    def oracle(videos, prompts):
        return videos.mean(dim=(1, 2, 3, 4)).tolist()

    trainer, metrics = run_one_seiko_round(tiny_wan_pipeline(), PROMPTS, OPTIONS, tmp_path / "seiko", oracle=oracle)
    assert metrics["round/queries"] == 4 and len(trainer.feedback) == 4 and metrics["train/kl_pretrained"] >= 0
