"""ELEGANT and SEIKO on a tiny random SDXL pipeline (two text encoders, pooled embeddings, added time ids, Euler
scheduler converted for the sampler): the guided per-step KL, stock reload, the library's reload, a SEIKO round."""

from family_checks import (
    assert_step_kls_are_closed_form,
    redness,
    run_one_seiko_round,
    tiny_config,
    train_save_and_reload,
)

from hf_control_ft import ElegantTrainer
from hf_control_ft.processes import StableDiffusionXLProcess
from hf_control_ft.testing import tiny_sdxl_pipeline, tiny_sdxl_unet_output

PROMPTS = ["a red cat", "the blue sea", "a dog"]
OPTIONS = dict(guidance_scale=3.0, negative_prompt="blurry", base_model="tiny/sdxl-random")


def test_sdxl_trains_and_reloads_in_stock_diffusers(tmp_path):
    trainer = ElegantTrainer.from_pipeline(tiny_sdxl_pipeline(), redness, tiny_config(), PROMPTS, **OPTIONS)
    process = trainer.process
    assert isinstance(process, StableDiffusionXLProcess) and trainer.sample_shape == (4, 8, 8)
    assert process.condition_dim == 32  # pooled projection of the second text encoder
    assert process.model.time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]  # (H, W, crop, H, W)
    assert type(trainer.schedule).__name__ == "DiffusionSchedule"  # Euler -> DDIM with the same noise schedule
    card = train_save_and_reload(trainer, tiny_sdxl_pipeline, tiny_sdxl_unet_output, lambda p: p.unet,
                                 tmp_path / "xl", PROMPTS[:2])
    assert "| model family | stable-diffusion-xl |" in card and '| negative prompt | "blurry" |' in card


def test_sdxl_per_step_kl_compares_the_guided_means():
    trainer = ElegantTrainer.from_pipeline(tiny_sdxl_pipeline(), redness, tiny_config(), PROMPTS, **OPTIONS)
    assert_step_kls_are_closed_form(trainer, PROMPTS[:2], rtol=1e-4, atol=1e-7)


def test_seiko_round_on_sdxl(tmp_path):
    trainer, metrics = run_one_seiko_round(tiny_sdxl_pipeline(), PROMPTS, OPTIONS, tmp_path / "seiko")
    assert metrics["round/queries"] == 4 and len(trainer.feedback) == 4 and metrics["train/kl_pretrained"] >= 0
