"""ELEGANT and SEIKO on a tiny random FLUX.2 [klein] pipeline (Qwen3 layers 9 / 18 / 27 side by side, patchified and
batch-normalised latents, 4-D position ids, CFG with the empty prompt unless distilled): the pipeline's velocity,
noise levels and decode, the per-step KL, stock reload, library reload, a SEIKO round."""

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
from hf_control_ft.processes import Flux2KleinProcess
from hf_control_ft.testing.families import tiny_flux2_klein_pipeline, tiny_flux2_output

PROMPTS = ["a red cat", "the blue sea is wide", "a dog"]
OPTIONS = dict(guidance_scale=4.0, max_sequence_length=32, height=16, width=16, base_model="tiny/flux2-klein-random")


@pytest.mark.parametrize("distilled", [False, True])
def test_flux2_network_noise_levels_and_decode_are_the_pipelines(distilled):
    """One step of the guided network equals the pipeline's step (distilled: no CFG), the schedule's noise levels are
    the pipeline's (its empirical mu), and decoding gives the pipeline's images."""
    pipe = tiny_flux2_klein_pipeline(is_distilled=distilled)
    trainer = ElegantTrainer.from_pipeline(pipe, redness, tiny_config(num_inference_steps=2), PROMPTS, **OPTIONS)
    process = trainer.process
    assert isinstance(process, Flux2KleinProcess) and trainer.sample_shape == (16, 4, 4)
    assert process.condition_dim == 48 and process.model.do_guidance is not distilled
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    process.set_conditions(PROMPTS[:2])
    with torch.no_grad():
        v = process.model(x, trainer.schedule.timestep(0).expand(2))
    kwargs = dict(prompt=PROMPTS[:2], guidance_scale=4.0, height=16, width=16, num_inference_steps=1,
                  max_sequence_length=32, latents=x.clone())
    expected = pipe(output_type="pt", **kwargs).images
    with torch.no_grad():
        torch.testing.assert_close(process.decode(x - v), expected, rtol=1e-4, atol=1e-4)
    many = ElegantTrainer.from_pipeline(tiny_flux2_klein_pipeline(is_distilled=distilled), redness,
                                        tiny_config(num_inference_steps=4), PROMPTS, **OPTIONS)
    pipe(**{**kwargs, "num_inference_steps": 4}, output_type="latent")
    torch.testing.assert_close(many.schedule.timesteps, pipe.scheduler.timesteps.float())


def test_flux2_trains_and_reloads_in_stock_diffusers(tmp_path):
    trainer = ElegantTrainer.from_pipeline(tiny_flux2_klein_pipeline(), redness, tiny_config(), PROMPTS, **OPTIONS)
    card = train_save_and_reload(trainer, tiny_flux2_klein_pipeline, tiny_flux2_output, lambda p: p.transformer,
                                 tmp_path / "flux2", PROMPTS[:2])
    assert "| model family | flux2-klein |" in card and "flow-matching" in card


def test_flux2_per_step_kl_is_the_closed_form_and_a_negative_prompt_is_refused():
    trainer = ElegantTrainer.from_pipeline(tiny_flux2_klein_pipeline(), redness, tiny_config(), PROMPTS, **OPTIONS)
    assert_step_kls_are_closed_form(trainer, PROMPTS[:2])
    with pytest.raises(ValueError, match="--negative_prompt"):
        ElegantTrainer.from_pipeline(tiny_flux2_klein_pipeline(), redness, tiny_config(), PROMPTS,
                                     **{**OPTIONS, "negative_prompt": "blurry"})


@pytest.mark.slow
def test_seiko_round_on_flux2(tmp_path):
    trainer, metrics = run_one_seiko_round(tiny_flux2_klein_pipeline(), PROMPTS, OPTIONS, tmp_path / "seiko")
    assert metrics["round/queries"] == 4 and len(trainer.feedback) == 4 and metrics["train/kl_pretrained"] >= 0
