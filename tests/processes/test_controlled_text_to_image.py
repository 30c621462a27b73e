"""ControlledTextToImage on every family: the trained sampler (learned initial noise + stochastic chain)
reproduces the trainer's samples; the family's own sampler runs with the LoRA on and off."""

import pytest
import torch
from family_checks import redness, tiny_config

from hf_control_ft import ElegantTrainer
from hf_control_ft.pipelines import ControlledTextToImage
from hf_control_ft.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

FAMILIES = {
    "sd": (tiny_sd_pipeline, {}),
    "sdxl": (tiny_sdxl_pipeline, {"negative_prompt": "blurry"}),
    "sd3": (tiny_sd3_pipeline, {"max_sequence_length": 16}),
    "flux": (tiny_flux_pipeline, {"max_sequence_length": 8, "height": 16, "width": 16}),
}


def trained(make, options, reward=redness) -> ElegantTrainer:
    trainer = ElegantTrainer.from_pipeline(make(), reward, tiny_config(num_inference_steps=3), ["a cat", "the dog"],
                                           guidance_scale=3.0, **options)
    trainer.train()
    return trainer


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_controlled_text_to_image_samples_the_trained_distribution(family, tmp_path):
    make, options = FAMILIES[family]
    trainer = trained(make, options)
    trainer.save_pretrained(str(tmp_path / family))
    pipe = ControlledTextToImage.from_control(str(tmp_path / family), pipeline=make())
    out = pipe(["a cat", "the dog"], generator=torch.Generator().manual_seed(0), output_type="latent").images
    expected = trainer.sample(prompts=["a cat", "the dog"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, expected)
    images = pipe("a cat", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and 0 <= float(images.min()) <= float(images.max()) <= 1
    ode = pipe("a cat", sampler="ode", generator=torch.Generator().manual_seed(1), output_type="pt").images
    base = pipe("a cat", sampler="ode", generator=torch.Generator().manual_seed(1), output_type="pt",
                controlled=False).images
    assert ode.shape == base.shape == (1, 3, 16, 16) and not torch.equal(ode, base)  # the LoRA is active
    assert len(pipe("a cat").images) == 1  # PIL
    with pytest.raises(ValueError, match="sampler must be one of"):
        pipe("a cat", sampler="heun")


NEWER = {  # family: (pipeline, options, shape of one decoded sample)
    "qwen-image": ("tiny_qwen_image_pipeline", {"max_sequence_length": 512, "height": 32, "width": 32}, (3, 32, 32)),
    "flux2-klein": ("tiny_flux2_klein_pipeline", {"max_sequence_length": 32, "height": 16, "width": 16}, (3, 16, 16)),
    "z-image": ("tiny_z_image_pipeline", {"max_sequence_length": 64, "height": 16, "width": 16}, (3, 16, 16)),
    "wan": ("tiny_wan_pipeline", {"max_sequence_length": 16, "height": 32, "width": 32, "num_frames": 5},
            (5, 3, 32, 32)),
}


@pytest.mark.parametrize("family", sorted(NEWER))
def test_controlled_text_to_image_on_the_newer_families(family, tmp_path):
    """The trained sampler reproduces the trainer's samples; the family's own pipeline call (its own guidance
    argument names, Wan's frames) runs with the LoRA on and off; videos come back as tensors, arrays and PIL
    frames."""
    from hf_control_ft.testing import families

    from hf_control_ft.rewards import PerFrameReward

    name, options, shape = NEWER[family]
    make = getattr(families, name)
    if family == "wan":
        with pytest.raises(ValueError, match="PerFrameReward"):  # an image reward on videos: a hint, not a crash
            trained(make, options)
    trainer = trained(make, options, PerFrameReward(redness) if family == "wan" else redness)
    trainer.save_pretrained(str(tmp_path / family))
    pipe = ControlledTextToImage.from_control(str(tmp_path / family), pipeline=make())
    out = pipe(["a cat", "the dog"], generator=torch.Generator().manual_seed(0), output_type="latent").images
    expected = trainer.sample(prompts=["a cat", "the dog"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, expected)
    samples = pipe("a cat", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert samples.shape == (2, *shape) and 0 <= float(samples.min()) <= float(samples.max()) <= 1
    ode = pipe("a cat", sampler="ode", generator=torch.Generator().manual_seed(1), output_type="pt").images
    base = pipe("a cat", sampler="ode", generator=torch.Generator().manual_seed(1), output_type="pt",
                controlled=False).images
    assert ode.shape == base.shape == (1, *shape) and not torch.equal(ode, base)  # the LoRA is active
    pil = pipe("a cat").images
    assert len(pil) == 1 and (len(pil[0]) == shape[0] if family == "wan" else pil[0].size == shape[1:][::-1])


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_push_pull_and_stock_reload_through_a_local_hub(family, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from hub_server import HubServer
    from huggingface_hub import snapshot_download

    from hf_control_ft.testing import tiny_flux_transformer_output, tiny_sdxl_unet_output

    fingerprint = tiny_sdxl_unet_output if family == "sdxl" else tiny_flux_transformer_output
    make, options = FAMILIES[family]
    trainer = trained(make, options)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    with HubServer() as hub:
        trainer.push_to_hub(f"me/tiny-{family}", token="hf_x", endpoint=hub.url)
        snapshot = snapshot_download(f"me/tiny-{family}", endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
        pulled = ControlledTextToImage.from_control(f"me/tiny-{family}", pipeline=make(), endpoint=hub.url,
                                                    cache_dir=str(tmp_path / "cache2"))
    stock = make()
    stock.load_lora_weights(snapshot)
    network = stock.unet if family == "sdxl" else stock.transformer
    assert torch.equal(fingerprint(network), fingerprint(trainer.process.lora_model))
    torch.testing.assert_close(
        pulled("a cat", generator=torch.Generator().manual_seed(0), output_type="latent").images,
        trainer.sample(prompts=["a cat"], generator=torch.Generator().manual_seed(0)))
