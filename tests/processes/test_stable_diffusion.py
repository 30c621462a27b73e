"""Text-conditioned ELEGANT on a tiny random Stable Diffusion pipeline; save / load / push / pull round trips."""

import json
import os
import shutil

import pytest
import torch
from diffusers import PNDMScheduler, UNet2DModel
from hub_server import HubServer
from PIL import Image
from safetensors import safe_open

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.core.control import lora_parameters, set_control_enabled
from hf_control_ft.core.kl import gaussian_kl
from hf_control_ft.pipelines.controlled import ControlledDiffusionPipeline, ControlledStableDiffusionPipeline
from hf_control_ft.processes.stable_diffusion import load_prompts
from hf_control_ft.rewards.image_rewards import BrightnessReward, SaturationReward, WeightedSumReward
from hf_control_ft.serialization.saved import HubPushError
from hf_control_ft.testing import tiny_components, tiny_sd_pipeline, tiny_unet_output

PROMPTS = ["a cat", "the dog", "a red car"]


def sd_config(**kw):
    base = dict(alpha=0.05, eta=1.0, num_inference_steps=3, train_steps=2, batch_size=2, value_num_rollouts=2,
                value_train_steps=2, noise_train_steps=2, noise_num_steps=2, noise_batch_size=2, aux_hidden=8,
                learning_rate=5e-2, lora_rank=2, lora_alpha=6.0, report_to=None)
    base.update(kw)
    return ElegantConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two drift iterations on the tiny pipeline, saved with a card, metrics and a sample grid."""
    torch.manual_seed(0)
    reward = WeightedSumReward({"brightness": (1.0, BrightnessReward()), "saturation": (0.5, SaturationReward())})
    trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), reward, sd_config(), prompts=PROMPTS,
                                           guidance_scale=2.0, base_model="tiny/sd-random")
    before = [p.detach().clone() for p in lora_parameters(trainer.model)]
    summary = trainer.train()
    latents = trainer.sample(prompts=PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    images = trainer.decode(latents)
    grid = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    out = tmp_path_factory.mktemp("sd") / "model"
    trainer.save_pretrained(str(out), metrics={"reward": summary["train/reward"], "kl": summary["train/kl"]},
                            sample_grid=grid)
    return dict(trainer=trainer, before=before, summary=summary, latents=latents, images=images, dir=str(out))


def test_training_updates_lora_and_reports_guided_kl(trained):
    trainer, summary = trained["trainer"], trained["summary"]
    assert type(trainer) is ElegantTrainer and type(trainer.process).__name__ == "StableDiffusionProcess"
    assert trainer.sample_shape == (4, 8, 8)
    assert summary["train/kl"] > 0 and torch.isfinite(torch.tensor(summary["train/objective"]))
    assert any(not torch.equal(a, b) for a, b in zip(trained["before"], lora_parameters(trainer.model)))
    assert trained["latents"].shape == (2, 4, 8, 8)
    assert trained["images"].shape == (2, 3, 16, 16) and 0 <= trained["images"].min() <= trained["images"].max() <= 1
    assert all(p in PROMPTS for p in trainer.process.current_conditions)


def test_saved_files_card_and_adapter_metadata(trained):
    d = trained["dir"]
    assert {"pytorch_lora_weights.safetensors", "initial_noise", "elegant_config.json", "stable_diffusion.json",
            "README.md", "sample_grid.png"} <= set(os.listdir(d))
    with safe_open(os.path.join(d, "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 6.0
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
    card = open(os.path.join(d, "README.md")).read()
    assert card.startswith("---\n") and "base_model: tiny/sd-random" in card and "license: apache-2.0" in card
    assert "weighted_sum(1*brightness, 0.5*saturation)" in card
    assert "| alpha (reward units per nat) | 0.05 |" in card and "| eta (DDIM stochasticity) | 1.0 |" in card
    assert f"| reward | {trained['summary']['train/reward']:.6g} |" in card
    assert "![samples](sample_grid.png)" in card and "load_lora_weights" in card
    assert json.load(open(os.path.join(d, "stable_diffusion.json")))["guidance_scale"] == 2.0


def test_stock_load_lora_weights_reproduces_trained_unet(trained):
    pipe = tiny_sd_pipeline()
    base = tiny_unet_output(pipe.unet)
    pipe.load_lora_weights(trained["dir"])
    assert pipe.unet.peft_config["default_0"].lora_alpha == 6.0  # survives thanks to the metadata
    trained_out = tiny_unet_output(trained["trainer"].model.unet)
    assert torch.equal(tiny_unet_output(pipe.unet), trained_out)
    assert not torch.allclose(base, trained_out, atol=1e-4)


def test_controlled_pipeline_reproduces_trained_samples(trained):
    pipe = ControlledStableDiffusionPipeline(**tiny_components()).load_control(trained["dir"])
    out = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(out, trained["latents"])
    images = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(images, trained["images"])
    pil = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    base = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="latent", controlled=False,
                use_initial_noise=False).images
    assert not torch.allclose(base, out, atol=1e-4)


def test_push_and_pull_through_a_local_hub(trained, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import hf_hub_download, snapshot_download

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    token = "hf_test_secret_token_123"
    with HubServer() as hub:
        local = tmp_path / "push"
        commit = trained["trainer"].push_to_hub("me/tiny-elegant", token=token, endpoint=hub.url,
                                                save_directory=str(local), metrics={"reward": 1.0})
        repo = hub.repos["me/tiny-elegant"]
        assert len(repo.commits) == 1 and commit.oid == repo.sha
        assert {"pytorch_lora_weights.safetensors", "README.md", "initial_noise/model.safetensors",
                "initial_noise/config.json", "elegant_config.json"} <= set(repo.files)
        assert all(auth == f"Bearer {token}" for auth in hub.authorizations)
        assert b"me/tiny-elegant" in repo.files["README.md"]  # loading snippets name the repo
        snapshot = snapshot_download("me/tiny-elegant", endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
        card = hf_hub_download("me/tiny-elegant", "README.md", endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
        assert open(card).read().startswith("---\n")
        pipe = tiny_sd_pipeline()
        pipe.load_lora_weights(snapshot)
        assert torch.equal(tiny_unet_output(pipe.unet), tiny_unet_output(trained["trainer"].model.unet))
        controlled = ControlledStableDiffusionPipeline(**tiny_components()).load_control(
            "me/tiny-elegant", endpoint=hub.url, cache_dir=str(tmp_path / "cache2"))
        out = controlled(PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="latent").images
        assert torch.equal(out, trained["latents"])

        hub.refuse_commits["me/tiny-elegant"] = "Storage quota exceeded for this namespace"
        refused = tmp_path / "refused"
        with pytest.raises(HubPushError, match="Storage quota exceeded") as err:
            trained["trainer"].push_to_hub("me/tiny-elegant", token=token, endpoint=hub.url,
                                           save_directory=str(refused))
        assert token not in str(err.value)
        assert (refused / "pytorch_lora_weights.safetensors").is_file() and (refused / "README.md").is_file()
        assert len(repo.commits) == 1


def test_guided_kl_is_the_kl_of_the_sampled_guided_means():
    pipe = tiny_sd_pipeline()
    trainer = ElegantTrainer.from_pipeline(pipe, BrightnessReward(), sd_config(gradient_checkpointing=False),
                                           prompts=PROMPTS, guidance_scale=3.0)
    with torch.no_grad():
        for p in lora_parameters(trainer.model):
            p.add_(0.3 * torch.randn_like(p))
    trainer.process.set_conditions(PROMPTS[:2])
    sampler, schedule, unet = trainer.sampler, trainer.schedule, trainer.model.unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    k = 0  # a random step (at 3 steps the next one is the jump into the grid's end: deterministic)
    t = schedule.timestep(k).expand(2)
    cond, neg = trainer.model.prompt_embeds, trainer.model.negative_embeds.expand(2, -1, -1)

    def guided(enabled):
        set_control_enabled(unet, enabled)
        with torch.no_grad():
            e_u = unet(x, t, encoder_hidden_states=neg).sample
            e_c = unet(x, t, encoder_hidden_states=cond).sample
        set_control_enabled(unet, True)
        return e_u + 3.0 * (e_c - e_u), e_c

    (g_ft, c_ft), (g_pre, c_pre) = guided(True), guided(False)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x_next, kl = sampler.step_with_kl(x, k, noise)
    mu_ft, mu_pre = schedule.mean(g_ft, x, k), schedule.mean(g_pre, x, k)
    torch.testing.assert_close(kl, gaussian_kl(mu_ft, mu_pre, schedule.std[k]), rtol=1e-4, atol=1e-5)
    # the sampler batches the conditional and unconditional UNet calls: float rounding differs slightly
    torch.testing.assert_close(x_next, schedule.step_from_mean(mu_ft, k, noise), rtol=1e-4, atol=1e-4)
    unguided = gaussian_kl(schedule.mean(c_ft, x, k), schedule.mean(c_pre, x, k), schedule.std[k])
    assert not torch.allclose(kl, unguided, rtol=1e-2)


def test_adapter_aware_checkpointing_gives_the_plain_gradients():
    """Block checkpointing recomputes the pretrained branch with adapters off; diffusers' default checkpoint
    function recomputes it under the current (enabled) adapter state and breaks."""

    def lora_grads(mode):
        torch.manual_seed(0)
        pipe = tiny_sd_pipeline()
        trainer = ElegantTrainer.from_pipeline(pipe, BrightnessReward(),
                                               sd_config(gradient_checkpointing=mode == "adapter_aware"),
                                               prompts=PROMPTS, guidance_scale=2.0)
        if mode == "diffusers_default":
            pipe.unet.enable_gradient_checkpointing()
        with torch.no_grad():
            for p in lora_parameters(trainer.model):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trainer.process.set_conditions(PROMPTS[:2])
        x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        traj = trainer.sampler.rollout(x_T, torch.Generator().manual_seed(6))
        _, grad_x0 = trainer.reward_and_gradient(traj.samples)
        trainer.sampler.backpropagate(traj, -grad_x0 / 2, 0.5)
        return torch.cat([p.grad.flatten() for p in lora_parameters(trainer.model)])

    plain = lora_grads("none")
    assert plain.abs().sum() > 0
    torch.testing.assert_close(lora_grads("adapter_aware"), plain, rtol=1e-4, atol=1e-6)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        lora_grads("diffusers_default")


def test_bf16_autocast_keeps_lora_in_fp32_and_trains():
    pipe = tiny_sd_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)  # SD 1.5 ships PNDM: converted to DDIM
    trainer = ElegantTrainer.from_pipeline(pipe, BrightnessReward(), sd_config(learn_initial_noise=False, train_steps=1),
                                           prompts=PROMPTS, mixed_precision="bf16", guidance_scale=1.0)
    assert type(trainer.schedule.scheduler).__name__ == "DDIMScheduler"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # the user's pipeline keeps its scheduler
    # kl_precision="fp32" (default): the UNet keeps fp32 weights for the KL passes; the VAE runs in bf16
    assert pipe.unet.conv_in.weight.dtype == torch.float32 and pipe.vae.dtype == torch.bfloat16
    params = lora_parameters(trainer.model)
    assert params and all(p.dtype == torch.float32 for p in params)
    metrics = trainer.train()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert torch.isfinite(torch.tensor(metrics["train/kl"]))


def test_prompt_sources(tmp_path):
    from datasets import Dataset

    f = tmp_path / "prompts.txt"
    f.write_text("a cat\n\n  the dog \n")
    assert load_prompts(str(f)) == ["a cat", "the dog"]
    assert load_prompts(Dataset.from_dict({"text": ["x", "y"]}), column="text") == ["x", "y"]
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(Dataset.from_dict({"text": ["x"]}))
    with pytest.raises(ValueError, match="not a file"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="must be strings"):
        load_prompts(["ok", 3])


def test_sd_reward_errors_name_the_reward():
    def my_image_reward(images, prompts):
        assert len(prompts) == images.shape[0]
        return images.mean(dim=(1, 2, 3)).unsqueeze(1)  # wrong shape (B, 1)

    trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), my_image_reward,
                                           sd_config(learn_initial_noise=False), prompts=PROMPTS)
    with pytest.raises(ValueError, match=r"my_image_reward.*shape \(2, 1\)"):
        trainer.train()


def test_unconditional_controlled_pipeline_reproduces_trainer(tmp_path):
    from diffusers import DDIMScheduler

    def unet():
        torch.manual_seed(0)
        return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)

    def sched():
        return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)

    cfg = sd_config(batch_size=4, lora_rank=2, lora_alpha=4.0, lora_target_modules=["to_q", "to_k", "to_v"])
    trainer = ElegantTrainer(cfg, unet(), sched(), BrightnessReward(), (3, 8, 8))
    trainer.train()
    x = trainer.sample(4, generator=torch.Generator().manual_seed(0))
    trainer.save_pretrained(str(tmp_path / "digits"), base_model="me/tiny-unet")
    card = open(tmp_path / "digits" / "README.md").read()
    assert "ControlledDiffusionPipeline" in card and "unconditional-image-generation" in card
    pipe = ControlledDiffusionPipeline.from_pretrained(str(tmp_path / "digits"), unet=unet(), scheduler=sched())
    y = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(x, y)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    base = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="latent", controlled=False,
                use_initial_noise=False).images
    assert not torch.allclose(base, y, atol=1e-4)
    reloaded = ElegantTrainer.from_pretrained(str(tmp_path / "digits"), unet(), sched(), BrightnessReward())
    assert torch.equal(reloaded.sample(4, generator=torch.Generator().manual_seed(0)), x)
    assert reloaded.lora_config.lora_alpha == 4.0


def test_sd_trainer_from_pretrained_resumes_the_saved_model(trained):
    resumed = ElegantTrainer.from_pretrained(trained["dir"], pipeline=tiny_sd_pipeline(), reward_fn=BrightnessReward(),
                                             prompts=PROMPTS)
    assert resumed.process.options.guidance_scale == 2.0 and resumed.config.lora_alpha == 6.0
    latents = resumed.sample(prompts=PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    assert torch.equal(latents, trained["latents"])


def test_from_control_loads_the_base_pipeline_from_disk(trained, tmp_path):
    tiny_sd_pipeline().save_pretrained(str(tmp_path / "base"))
    pipe = ControlledStableDiffusionPipeline.from_control(trained["dir"], base_model=str(tmp_path / "base"))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(out, trained["latents"])


def test_sd_training_resumes_from_a_checkpoint_exactly(tmp_path):
    def run(resume):
        cfg = sd_config(train_steps=3, checkpointing_steps=1, output_dir=str(tmp_path))
        trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), BrightnessReward(), cfg, prompts=PROMPTS)
        summary = trainer.train(resume_from_checkpoint="latest" if resume else None)
        return summary, torch.cat([p.detach().flatten() for p in lora_parameters(trainer.model)])

    _, full = run(resume=False)
    shutil.rmtree(tmp_path / "checkpoint-3")  # as if the run had crashed after step 2
    summary, resumed = run(resume=True)
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert torch.equal(resumed, full)


def test_controlled_pipeline_on_the_digits_unet_with_ddpm(tmp_path):
    from hf_control_ft.tasks.digits import digits_scheduler, digits_unet_config

    def unet():
        torch.manual_seed(0)
        return UNet2DModel(**digits_unet_config())

    cfg = sd_config(batch_size=3, num_inference_steps=4)
    trainer = ElegantTrainer(cfg, unet(), digits_scheduler(), BrightnessReward(), (1, 8, 8))
    trainer.train()
    x = trainer.sample(3, generator=torch.Generator().manual_seed(0))
    grid = Image.new("L", (24, 8))
    trainer.save_pretrained(str(tmp_path / "digits"), metrics={"genuine_reward": 0.5}, sample_grid=grid)
    pipe = ControlledDiffusionPipeline.from_pretrained(str(tmp_path / "digits"), unet=unet(),
                                                       scheduler=digits_scheduler())
    out = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(out, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    pil = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "L"


def test_unset_options_take_each_familys_pipeline_defaults(caplog):
    """guidance / T5 length left None are the family pipeline's own defaults; a negative prompt without
    classifier-free guidance is refused (FLUX) or warned about (guidance_scale <= 1)."""
    import logging

    from hf_control_ft.processes import (
        FluxProcess,
        StableDiffusion3Process,
        StableDiffusionOptions,
        StableDiffusionProcess,
        StableDiffusionXLProcess,
    )

    def resolved(cls, **kw):
        return StableDiffusionOptions(**kw).for_family(cls.family, cls.option_defaults, cls.uses_negative_prompt)

    assert resolved(StableDiffusionProcess).guidance_scale == 7.5
    assert resolved(StableDiffusionProcess).negative_prompt == ""
    assert resolved(StableDiffusionXLProcess).guidance_scale == 5.0
    sd3 = resolved(StableDiffusion3Process)
    assert (sd3.guidance_scale, sd3.max_sequence_length) == (7.0, 256)
    flux = resolved(FluxProcess)
    assert (flux.guidance_scale, flux.max_sequence_length, flux.negative_prompt) == (3.5, 512, None)
    assert resolved(FluxProcess, guidance_scale=2.0, max_sequence_length=256).max_sequence_length == 256
    with pytest.raises(ValueError, match="flux pipeline takes no negative prompt.*--negative_prompt"):
        resolved(FluxProcess, negative_prompt="blurry")
    with caplog.at_level(logging.WARNING):
        resolved(StableDiffusionProcess, guidance_scale=1.0, negative_prompt="blurry")
    assert "is ignored" in caplog.text
