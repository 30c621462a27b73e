"""ELEGANT and SEIKO on a tiny random Stable Diffusion 3 pipeline (flow matching, CFG, pooled projections, no T5):
per-step KL against the closed form, stock reload, Hub round trip, a SEIKO round, refusals."""

import os

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from family_checks import assert_step_kls_are_closed_form, mean_image_oracle, redness, run_one_seiko_round, tiny_config
from hub_server import HubServer

from hf_control_ft import ElegantTrainer
from hf_control_ft.core.control import lora_parameters, pretrained_mode
from hf_control_ft.processes import StableDiffusion3Process, process_from_pipeline
from hf_control_ft.testing import tiny_sd3_pipeline, tiny_sd3_transformer_output, tiny_sd_pipeline

PROMPTS = ["a cat", "the dog", "a red car"]
OPTIONS = dict(guidance_scale=3.0, max_sequence_length=16, base_model="tiny/sd3-random")


def sd3_config(**kw):
    return tiny_config(**kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = ElegantTrainer.from_pipeline(tiny_sd3_pipeline(), redness, sd3_config(), PROMPTS, **OPTIONS)
    before = [p.detach().clone() for p in lora_parameters(trainer.model)]
    summary = trainer.train()
    latents = trainer.sample(prompts=PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("sd3") / "model"
    trainer.save_pretrained(str(out), metrics={"reward": summary["train/reward"]})
    return dict(trainer=trainer, summary=summary, before=before, latents=latents, dir=str(out))


def test_sd3_process_trains_the_transformer_lora_on_the_flow_sde(trained):
    trainer, summary = trained["trainer"], trained["summary"]
    assert isinstance(trainer.process, StableDiffusion3Process)
    assert type(trainer.schedule).__name__ == "FlowMatchSchedule"
    assert trainer.sample_shape == (4, 8, 8) and trainer.process.condition_dim == 64  # pooled projections
    targets = set(trainer.process.lora_config.target_modules)
    assert {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"} <= targets  # joint attention
    assert summary["train/kl"] > 0 and torch.isfinite(torch.tensor(summary["train/objective"]))
    assert any(not torch.equal(a, b) for a, b in zip(trained["before"], lora_parameters(trainer.model)))
    images = trainer.decode(trained["latents"])
    assert images.shape == (2, 3, 16, 16) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_sd3_per_step_kl_is_the_closed_form_on_guided_velocities():
    trainer = ElegantTrainer.from_pipeline(tiny_sd3_pipeline(), redness, sd3_config(), PROMPTS, **OPTIONS)
    traj = assert_step_kls_are_closed_form(trainer, PROMPTS[:2])
    k = 1  # and in velocity form: kl_factor x ||v_ft - v_pre||^2, summed over all 256 dimensions
    x, t = traj.states[k], trainer.schedule.timestep(k).expand(2)
    with torch.no_grad():
        v_ft = trainer.process.model(x, t)
        with pretrained_mode(trainer.process.lora_model):
            v_pre = trainer.process.model(x, t)
    closed = trainer.schedule.kl_factor(k) * (v_ft - v_pre).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(traj.kl_steps[k], closed, rtol=2e-3, atol=1e-6)


def test_stock_load_lora_weights_reproduces_the_trained_transformer(trained):
    pipe = tiny_sd3_pipeline()
    base = tiny_sd3_transformer_output(pipe.transformer)
    pipe.load_lora_weights(trained["dir"])  # StableDiffusion3Pipeline's own loader, transformer.* keys
    ours = tiny_sd3_transformer_output(trained["trainer"].process.lora_model)
    assert torch.equal(tiny_sd3_transformer_output(pipe.transformer), ours)
    assert not torch.allclose(base, ours, atol=1e-6)
    card = open(os.path.join(trained["dir"], "README.md")).read()
    for text in ("base_model: tiny/sd3-random", "stable-diffusion-3", "flow-matching",
                 "| model family | stable-diffusion-3 |",
                 "stochasticity of the exact flow transitions, as DDIM's eta (1: memoryless)) | 0.5 |", "| classifier-free guidance scale | 3.0 |",
                 "pipe.load_lora_weights", "ControlledTextToImage.from_control"):
        assert text in card, text
    # the library's reload: same adapter, same initial noise, same samples
    again = ElegantTrainer.from_pretrained(trained["dir"], pipeline=tiny_sd3_pipeline())
    assert torch.equal(tiny_sd3_transformer_output(again.process.lora_model), ours)
    torch.testing.assert_close(again.sample(prompts=PROMPTS[:2], generator=torch.Generator().manual_seed(0)),
                               trained["latents"])


def test_sd3_push_and_pull_through_a_local_hub(trained, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import snapshot_download

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    with HubServer() as hub:
        trained["trainer"].push_to_hub("me/tiny-sd3-elegant", token="hf_x", endpoint=hub.url)
        snapshot = snapshot_download("me/tiny-sd3-elegant", endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
    pipe = tiny_sd3_pipeline()
    pipe.load_lora_weights(snapshot)
    assert torch.equal(tiny_sd3_transformer_output(pipe.transformer),
                       tiny_sd3_transformer_output(trained["trainer"].process.lora_model))


def test_seiko_round_on_sd3(tmp_path):
    calls = []

    def oracle(images, prompts):
        calls.append(len(prompts))
        return mean_image_oracle(images, prompts)

    trainer, metrics = run_one_seiko_round(tiny_sd3_pipeline(), PROMPTS, OPTIONS, tmp_path / "seiko", oracle)
    assert sum(calls) == 4 and metrics["round/queries"] == 4 and len(trainer.feedback) == 4
    assert metrics["train/kl_previous"] >= 0 and metrics["train/kl_pretrained"] >= 0


def test_sd3_refusals_name_the_problem():
    pipe = tiny_sd3_pipeline()
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        process_from_pipeline(pipe, sd3_config(), PROMPTS, **OPTIONS)
    with pytest.raises(ValueError, match=r"not supported; supported pipelines: \['Flux2KleinPipeline', 'FluxPipeline', "
                                         r"'QwenImagePipeline', 'StableDiffusion3Pipeline', 'StableDiffusionPipeline', "
                                         r"'StableDiffusionXLPipeline', 'WanPipeline', 'ZImagePipeline'\]"):
        process_from_pipeline(DiffusionPipeline(), sd3_config(), PROMPTS)
    # an SD 1.x pipeline still gets its own process
    assert type(process_from_pipeline(tiny_sd_pipeline(), sd3_config(), PROMPTS)).__name__ == "StableDiffusionProcess"
