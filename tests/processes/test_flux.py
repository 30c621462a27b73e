"""ELEGANT and SEIKO on a tiny random FLUX pipeline (packed latents, guidance embedding, CLIP + T5 built in memory,
dynamic shifting): the pipeline's own noise levels, the per-step KL, stock reload, a SEIKO round."""

import os

import numpy as np
import torch

from hf_control_ft import ElegantConfig, ElegantTrainer, SeikoConfig, SeikoTrainer
from hf_control_ft.core.control import lora_parameters, pretrained_mode
from hf_control_ft.processes import FluxProcess
from hf_control_ft.processes.flux import pack_latents, unpack_latents
from hf_control_ft.testing import scale_lora, tiny_flux_pipeline, tiny_flux_transformer_output

PROMPTS = ["a red cat", "the blue sea", "a dog"]
OPTIONS = dict(guidance_scale=3.5, max_sequence_length=8, height=16, width=16, base_model="tiny/flux-random")


def flux_config(**kw):
    base = dict(alpha=0.05, eta=0.5, num_inference_steps=4, train_steps=2, batch_size=2, value_num_rollouts=4,
                value_train_steps=2, noise_train_steps=2, noise_batch_size=4, aux_hidden=8, learning_rate=5e-2,
                lora_rank=2, report_to=None)
    base.update(kw)
    return ElegantConfig(**base)


def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


def test_packing_is_the_pipelines_and_invertible():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 8, 8))
    assert torch.equal(unpack_latents(pack_latents(x), 8, 8), x)


def test_flux_trains_on_the_pipelines_noise_levels_and_reloads_in_stock_diffusers(tmp_path):
    pipe = tiny_flux_pipeline()
    trainer = ElegantTrainer.from_pipeline(pipe, redness, flux_config(), PROMPTS, **OPTIONS)
    assert isinstance(trainer.process, FluxProcess) and trainer.sample_shape == (4, 8, 8)
    assert trainer.process.condition_dim == 32 and not trainer.process.model.do_guidance  # guidance embedding only
    # the noise levels FluxPipeline itself uses at this size (sigmas linspace(1, 1/K, K), shifted by mu(seq_len 16))
    pipe(PROMPTS[0], height=16, width=16, num_inference_steps=4, max_sequence_length=8, output_type="latent")
    torch.testing.assert_close(trainer.schedule.timesteps, pipe.scheduler.timesteps.float())
    assert trainer.schedule.mu is not None
    before = [p.detach().clone() for p in lora_parameters(trainer.model)]
    summary = trainer.train()
    assert summary["train/kl"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_parameters(trainer.model)))
    trainer.save_pretrained(str(tmp_path / "flux"))
    stock = tiny_flux_pipeline()
    base = tiny_flux_transformer_output(stock.transformer)
    stock.load_lora_weights(str(tmp_path / "flux"))  # FluxPipeline's own loader, transformer.* keys
    ours = tiny_flux_transformer_output(trainer.process.lora_model)
    assert torch.equal(tiny_flux_transformer_output(stock.transformer), ours)
    assert not torch.allclose(base, ours, atol=1e-6)
    card = open(os.path.join(tmp_path / "flux", "README.md")).read()
    assert "| model family | flux |" in card and "guidance embedding" in card and "flow-matching" in card
    again = ElegantTrainer.from_pretrained(str(tmp_path / "flux"), pipeline=tiny_flux_pipeline())
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(again.sample(prompts=PROMPTS[:2], generator=g),
                               trainer.sample(prompts=PROMPTS[:2], generator=torch.Generator().manual_seed(0)))


def test_flux_per_step_kl_is_the_closed_form_summed_over_unpacked_dimensions():
    trainer = ElegantTrainer.from_pipeline(tiny_flux_pipeline(), redness, flux_config(), PROMPTS, **OPTIONS)
    scale_lora(trainer.process.lora_model, 0.2, seed=3)
    trainer.process.set_conditions(PROMPTS[:2])
    g = torch.Generator().manual_seed(0)
    traj = trainer.sampler.rollout(torch.randn((2, *trainer.sample_shape), generator=g), g, measure_kl=True)
    schedule, net = trainer.schedule, trainer.process.model
    for k in range(len(schedule)):
        t = schedule.timestep(k).expand(2)
        with torch.no_grad():
            v_ft = net(traj.states[k], t)
            with pretrained_mode(trainer.process.lora_model):
                v_pre = net(traj.states[k], t)
        expected = schedule.kl_factor(k) * (v_ft - v_pre).pow(2).flatten(1).sum(1)
        torch.testing.assert_close(traj.kl_steps[k], expected, rtol=2e-3, atol=1e-6)
    assert float(traj.kl.min()) > 0
    assert np.isclose(float(schedule.levels[0]), 1.0)


def test_seiko_round_on_flux(tmp_path):
    def oracle(images, prompts):
        return images.mean(dim=(1, 2, 3)).tolist()

    cfg = SeikoConfig(num_rounds=1, queries_per_round=4, num_inference_steps=3, train_steps=1, batch_size=2,
                      value_num_rollouts=4, value_train_steps=2, noise_train_steps=2, noise_batch_size=4,
                      reward_train_steps=3, aux_hidden=8, lora_rank=2, eta=0.5, report_to=None,
                      output_dir=str(tmp_path / "seiko"))
    trainer = SeikoTrainer.from_pipeline(tiny_flux_pipeline(), oracle, cfg, PROMPTS, **OPTIONS)
    metrics = trainer.train()
    assert metrics["round/queries"] == 4 and len(trainer.feedback) == 4 and metrics["train/kl_pretrained"] >= 0
