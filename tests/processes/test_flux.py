"""ELEGANT and SEIKO on a tiny random FLUX pipeline (packed latents, guidance embedding, CLIP + T5 built in memory,
dynamic shifting): the pipeline's own noise levels, the per-step KL, stock reload, a SEIKO round."""

import numpy as np
import torch
from family_checks import (
    assert_step_kls_are_closed_form,
    redness,
    run_one_seiko_round,
    tiny_config,
    train_save_and_reload,
)

from hf_control_ft import ElegantTrainer
from hf_control_ft.processes import FluxProcess
from hf_control_ft.processes.flux import pack_latents, unpack_latents
from hf_control_ft.testing import tiny_flux_pipeline, tiny_flux_transformer_output

PROMPTS = ["a red cat", "the blue sea", "a dog"]
OPTIONS = dict(guidance_scale=3.5, max_sequence_length=8, height=16, width=16, base_model="tiny/flux-random")


def test_packing_is_the_pipelines_and_invertible():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 8, 8))
    assert torch.equal(unpack_latents(pack_latents(x), 8, 8), x)


def test_flux_trains_on_the_pipelines_noise_levels_and_reloads_in_stock_diffusers(tmp_path):
    pipe = tiny_flux_pipeline()
    trainer = ElegantTrainer.from_pipeline(pipe, redness, tiny_config(), PROMPTS, **OPTIONS)
    assert isinstance(trainer.process, FluxProcess) and trainer.sample_shape == (4, 8, 8)
    assert trainer.process.condition_dim == 32 and not trainer.process.model.do_guidance  # guidance embedding only
    # the noise levels FluxPipeline itself uses at this size (sigmas linspace(1, 1/K, K), shifted by mu(seq_len 16))
    pipe(PROMPTS[0], height=16, width=16, num_inference_steps=4, max_sequence_length=8, output_type="latent")
    torch.testing.assert_close(trainer.schedule.timesteps, pipe.scheduler.timesteps.float())
    assert trainer.schedule.mu is not None
    card = train_save_and_reload(trainer, tiny_flux_pipeline, tiny_flux_transformer_output, lambda p: p.transformer,
                                 tmp_path / "flux", PROMPTS[:2])
    assert "| model family | flux |" in card and "guidance embedding" in card and "flow-matching" in card


def test_flux_per_step_kl_is_the_closed_form_summed_over_unpacked_dimensions():
    trainer = ElegantTrainer.from_pipeline(tiny_flux_pipeline(), redness, tiny_config(), PROMPTS, **OPTIONS)
    assert_step_kls_are_closed_form(trainer, PROMPTS[:2])
    assert np.isclose(float(trainer.schedule.levels[0]), 1.0)


def test_seiko_round_on_flux(tmp_path):
    trainer, metrics = run_one_seiko_round(tiny_flux_pipeline(), PROMPTS, OPTIONS, tmp_path / "seiko")
    assert metrics["round/queries"] == 4 and len(trainer.feedback) == 4 and metrics["train/kl_pretrained"] >= 0


def test_flux_takes_its_own_pipeline_defaults_and_refuses_a_negative_prompt():
    """Options left unset take FluxPipeline's defaults (guidance embedding 3.5, T5 length 512), not SD's 7.5; a
    negative prompt, which FLUX.1 would silently ignore, is an error that names the flag."""
    import pytest

    options = dict(height=16, width=16, base_model="tiny/flux-random")
    trainer = ElegantTrainer.from_pipeline(tiny_flux_pipeline(), redness, tiny_config(), PROMPTS, **options)
    assert trainer.process.options.guidance_scale == 3.5 and trainer.process.model.guidance_scale == 3.5
    assert trainer.process.options.max_sequence_length == 512
    with pytest.raises(ValueError, match="--negative_prompt"):
        ElegantTrainer.from_pipeline(tiny_flux_pipeline(), redness, tiny_config(), PROMPTS,
                                     negative_prompt="blurry", **options)
