"""Pipelines at the real shapes of the models people fine-tune, with random weights (no download), for
``benchmarks/sd_step.py --model``. Compute and memory depend on the shapes, not on the weights.

* ``sd15``: Stable Diffusion 1.5 (860M UNet, CLIP ViT-L/14 text encoder), 512x512;
* ``sdxl``: SDXL base (2.6B UNet with text-time conditioning, CLIP ViT-L + OpenCLIP bigG), 1024x1024;
* ``sd3``: SD3.5 medium (2.2B MMDiT-X transformer, 16-channel VAE, two CLIP encoders; the T5-XXL encoder is left
  out, ``text_encoder_3=None``, a configuration diffusers supports: it only changes prompt encoding, which runs
  once per batch), 1024x1024;
* ``flux``: FLUX.1-dev (12B transformer, guidance embedding, packed latents; CLIP ViT-L and a 2-layer T5 of the
  XXL width, since the 4.7B encoder runs once per batch), 1024x1024.

``--tiny`` uses the test pipelines of :mod:`hf_control_ft.testing` instead (CPU smoke test).
"""

from __future__ import annotations

import torch

from hf_control_ft import testing

RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}


def _clip(hidden: int, layers: int, heads: int, projection: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(latent_channels: int, scaling: float, shift: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=shift is None, use_post_quant_conv=shift is None)


def sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae(4, 0.13025, None), text_encoder=_clip(768, 12, 12, 768, False),
                                     text_encoder_2=_clip(1280, 32, 20, 1280, True),
                                     tokenizer=testing.tiny_tokenizer(77), tokenizer_2=testing.tiny_tokenizer(77),
                                     unet=unet, scheduler=scheduler)


def sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(16, 1.5305, 0.0609), text_encoder=_clip(768, 12, 12, 768, True),
                                    tokenizer=testing.tiny_tokenizer(77),
                                    text_encoder_2=_clip(1280, 32, 20, 1280, True),
                                    tokenizer_2=testing.tiny_tokenizer(77), text_encoder_3=None, tokenizer_3=None)


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    t5_tokenizer = testing.tiny_t5_tokenizer(512)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                                 num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift=3.0)
    return FluxPipeline(scheduler=scheduler, vae=_vae(16, 0.3611, 0.1159),
                        text_encoder=_clip(768, 12, 12, 768, False),
                        tokenizer=testing.tiny_tokenizer(77), text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                        transformer=transformer)


def build_pipeline(model: str, tiny: bool, device: str = "cpu"):
    """The pipeline of ``model`` (``sd15``, ``sdxl``, ``sd3``, ``flux``): real shapes, or the test size. On a GPU
    the random weights are made there (a 12B transformer initialised on the CPU takes minutes)."""
    if device != "cpu" and not tiny:
        with torch.device(device):
            return build_pipeline(model, tiny, "cpu")
    if tiny:
        return {"sd15": testing.tiny_sd_pipeline, "sdxl": testing.tiny_sdxl_pipeline,
                "sd3": testing.tiny_sd3_pipeline, "flux": testing.tiny_flux_pipeline}[model]()
    if model == "sd15":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**testing.sd15_components())
    torch.manual_seed(0)
    return {"sdxl": sdxl_pipeline, "sd3": sd3_pipeline, "flux": flux_pipeline}[model]()
