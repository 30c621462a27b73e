"""ELEGANT and SEIKO on a tiny random Qwen-Image pipeline (Qwen2.5-VL captions of each prompt's length, packed
latents, true classifier-free guidance with the pipeline's norm rescaling, the 3-D VAE with per-channel latent
statistics): the pipeline's noise levels and velocity, the per-step KL, stock reload, library reload, a SEIKO round."""

import pytest
import torch
from family_checks import (
    assert_step_kls_are_closed_form,
    redness,
    run_one_seiko_round,
    tiny_config,
    train_save_and_reload,
)

from hf_control_ft import ElegantTrainer
from hf_control_ft.processes import QwenImageProcess
from hf_control_ft.processes.flux import pack_latents, unpack_latents
from hf_control_ft.testing.families import tiny_qwen_image_output, tiny_qwen_image_pipeline

PROMPTS = ["a red cat", "the blue sea is wide", "a dog"]
OPTIONS = dict(guidance_scale=4.0, max_sequence_length=512, height=32, width=32, base_model="tiny/qwen-image-random")


def test_qwen_image_network_and_decode_are_the_pipelines():
    """One Euler step of the guided network (different caption lengths, the negative prompt " ") equals the
    pipeline's own step, and the process decodes latents to the pipeline's images."""
    pipe = tiny_qwen_image_pipeline()
    trainer = ElegantTrainer.from_pipeline(pipe, redness, tiny_config(num_inference_steps=2), PROMPTS, **OPTIONS)
    process = trainer.process
    assert isinstance(process, QwenImageProcess) and trainer.sample_shape == (4, 8, 8)
    assert process.condition_dim == 16 and process.model.do_guidance and process.options.negative_prompt == " "
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    process.set_conditions(PROMPTS[:2])
    assert process.model.lengths[0] < process.model.lengths[1]
    with torch.no_grad():
        v = process.model(x, trainer.schedule.timestep(0).expand(2))
        images = process.decode(x)
    kwargs = dict(negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32, num_inference_steps=1,
                  max_sequence_length=512, latents=pack_latents(x))
    out = pipe(PROMPTS[:2], output_type="latent", **kwargs).images
    torch.testing.assert_close(unpack_latents(out, 8, 8), x - v, rtol=1e-4, atol=1e-5)
    expected = pipe(PROMPTS[:2], output_type="pt", **kwargs).images
    with torch.no_grad():
        torch.testing.assert_close(process.decode(x - v), expected, rtol=1e-4, atol=1e-4)
    assert images.shape == (2, 3, 32, 32)


def test_qwen_image_trains_on_the_pipelines_noise_levels_and_reloads_in_stock_diffusers(tmp_path):
    pipe = tiny_qwen_image_pipeline()
    trainer = ElegantTrainer.from_pipeline(pipe, redness, tiny_config(), PROMPTS, **OPTIONS)
    pipe(PROMPTS[0], height=32, width=32, num_inference_steps=4, output_type="latent")
    torch.testing.assert_close(trainer.schedule.timesteps, pipe.scheduler.timesteps.float())
    card = train_save_and_reload(trainer, tiny_qwen_image_pipeline, tiny_qwen_image_output, lambda p: p.transformer,
                                 tmp_path / "qwen", PROMPTS[:2])
    assert "| model family | qwen-image |" in card and "flow-matching" in card


def test_qwen_image_per_step_kl_is_the_closed_form():
    trainer = ElegantTrainer.from_pipeline(tiny_qwen_image_pipeline(), redness, tiny_config(), PROMPTS, **OPTIONS)
    assert_step_kls_are_closed_form(trainer, PROMPTS[:2])


@pytest.mark.slow
def test_seiko_round_on_qwen_image(tmp_path):
    trainer, metrics = run_one_seiko_round(tiny_qwen_image_pipeline(), PROMPTS, OPTIONS, tmp_path / "seiko")
    assert metrics["round/queries"] == 4 and len(trainer.feedback) == 4 and metrics["train/kl_pretrained"] >= 0
