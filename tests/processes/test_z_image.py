"""ELEGANT and SEIKO on a tiny random Z-Image pipeline (Qwen3 captions of each prompt's length through a chat
template, list-input transformer, negated velocity, guidance ``v_c + g (v_c - v_u)``): the pipeline's noise levels,
the per-step KL, stock reload, library reload, a SEIKO round."""

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
from hf_control_ft.processes import ZImageProcess
from hf_control_ft.testing.families import tiny_z_image_output, tiny_z_image_pipeline

PROMPTS = ["a red cat", "the blue sea", "a dog"]
OPTIONS = dict(guidance_scale=3.0, max_sequence_length=64, height=16, width=16, base_model="tiny/z-image-random")


def test_z_image_network_is_the_pipelines_velocity():
    """One Euler step of the library's guided network from the same start equals the pipeline's first step."""
    pipe = tiny_z_image_pipeline()
    trainer = ElegantTrainer.from_pipeline(pipe, redness, tiny_config(num_inference_steps=2), PROMPTS, **OPTIONS)
    process = trainer.process
    assert isinstance(process, ZImageProcess) and trainer.sample_shape == (16, 8, 8)
    assert process.condition_dim == 16 and process.model.do_guidance
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    process.set_conditions(PROMPTS[:2])
    with torch.no_grad():
        v = process.model(x, trainer.schedule.timestep(0).expand(2))
    out = pipe(PROMPTS[:2], negative_prompt=["", ""], height=16, width=16, num_inference_steps=1, guidance_scale=3.0,
               max_sequence_length=64, latents=x.clone(), output_type="latent").images
    torch.testing.assert_close(out, x - v, rtol=1e-4, atol=1e-5)  # one step from s = 1 to 0: x_0 = x - v


def test_z_image_trains_on_the_pipelines_noise_levels_and_reloads_in_stock_diffusers(tmp_path):
    pipe = tiny_z_image_pipeline()
    trainer = ElegantTrainer.from_pipeline(pipe, redness, tiny_config(), PROMPTS, **OPTIONS)
    pipe(PROMPTS[0], height=16, width=16, num_inference_steps=4, max_sequence_length=64, output_type="latent")
    torch.testing.assert_close(trainer.schedule.timesteps, pipe.scheduler.timesteps.float())
    assert trainer.schedule.mu is not None
    card = train_save_and_reload(trainer, tiny_z_image_pipeline, tiny_z_image_output, lambda p: p.transformer,
                                 tmp_path / "z", PROMPTS[:2])
    assert "| model family | z-image |" in card and "flow-matching" in card


def test_z_image_per_step_kl_is_the_closed_form():
    trainer = ElegantTrainer.from_pipeline(tiny_z_image_pipeline(), redness, tiny_config(), PROMPTS, **OPTIONS)
    assert_step_kls_are_closed_form(trainer, PROMPTS[:2])


def test_z_image_cached_captions_of_different_lengths_give_the_same_network():
    """Embeddings cached per prompt (different lengths, padded when gathered) condition the network as encoding the
    batch does."""
    fresh = ElegantTrainer.from_pipeline(tiny_z_image_pipeline(), redness, tiny_config(), PROMPTS, **OPTIONS)
    cached = ElegantTrainer.from_pipeline(tiny_z_image_pipeline(), redness, tiny_config(), PROMPTS,
                                          pre_compute_text_embeddings=True, **OPTIONS)
    x = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 600.0)
    outputs = []
    for trainer in (fresh, cached):
        trainer.process.set_conditions([PROMPTS[1], PROMPTS[2], PROMPTS[0]])
        with torch.no_grad():
            outputs.append(trainer.process.model(x, t))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_seiko_round_on_z_image(tmp_path):
    trainer, metrics = run_one_seiko_round(tiny_z_image_pipeline(), PROMPTS, OPTIONS, tmp_path / "seiko")
    assert metrics["round/queries"] == 4 and len(trainer.feedback) == 4 and metrics["train/kl_pretrained"] >= 0
