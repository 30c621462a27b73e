"""Pipelines at the real shapes of the models people fine-tune, with random weights (no download), for
``benchmarks/sd_step.py --model``. Compute and memory depend on the shapes, not on the weights.

* ``sd15``: Stable Diffusion 1.5 (860M UNet, CLIP ViT-L/14 text encoder), 512x512;
* ``sdxl``: SDXL base (2.6B UNet with text-time conditioning, CLIP ViT-L + OpenCLIP bigG), 1024x1024;
* ``sd3``: SD3.5 medium (2.2B MMDiT-X transformer, 16-channel VAE, two CLIP encoders; the T5-XXL encoder is left
  out, ``text_encoder_3=None``, a configuration diffusers supports: it only changes prompt encoding, which runs
  once per batch), 1024x1024;
* ``flux``: FLUX.1-dev (12B transformer, guidance embedding, packed latents; CLIP ViT-L and a 2-layer T5 of the
  XXL width, since the 4.7B encoder runs once per batch), 1024x1024.

* ``qwen-image``: Qwen-Image (20B MMDiT, 60 blocks, 16-channel 3-D VAE; a 2-layer Qwen2.5-VL text model of the 7B's
  width 3584), 1024x1024;
* ``flux2-klein``: FLUX.2 [klein] 4B (5 double- + 20 single-stream blocks of width 3072, the 32-channel VAE; a narrow
  28-layer Qwen3 of the 4B's width 2560, whose layers 9 / 18 / 27 make the 3 x 2560 prompt embedding), 1024x1024;
* ``z-image``: Z-Image (6B single-stream transformer, 30 + 2 + 2 blocks of width 3840; a narrow 2-layer Qwen3 of the
  4B's width 2560), 1024x1024;
* ``wan``: Wan 2.1 T2V 1.3B (30 blocks of width 1536, the causal video VAE; a 2-layer UMT5 of the XXL width 4096),
  480x832, 33 frames.

The reduced text encoders keep the width the transformer reads (the encoder runs once per batch, outside the drift
step being measured). :data:`PUBLISHED_PARAMETERS` holds each denoiser's published size; ``tests/test_model_shapes.py``
counts the configurations' parameters on the meta device against it.

``--tiny`` uses the test pipelines of :mod:`hf_control_ft.testing` instead (CPU smoke test).
"""

from __future__ import annotations

import torch

from hf_control_ft import testing

RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024, "qwen-image": 1024, "flux2-klein": 1024,
              "z-image": 1024, "wan": 480}
#: options besides the square resolution (real shapes / ``--tiny``)
SHAPE_OPTIONS = {"wan": {"height": 480, "width": 832, "num_frames": 33}}
TINY_OPTIONS = {"qwen-image": {"max_sequence_length": 512}, "wan": {"num_frames": 5, "height": 32, "width": 32}}
#: published parameter counts of the denoisers (billions)
PUBLISHED_PARAMETERS = {"flux": 12.0, "qwen-image": 20.0, "flux2-klein": 4.0,
                        "z-image": 6.0, "wan": 1.3}


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


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = sdxl_unet()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae(4, 0.13025, None), text_encoder=_clip(768, 12, 12, 768, False),
                                     text_encoder_2=_clip(1280, 32, 20, 1280, True),
                                     tokenizer=testing.tiny_tokenizer(77), tokenizer_2=testing.tiny_tokenizer(77),
                                     unet=unet, scheduler=scheduler)


def sd3_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = sd3_transformer()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(16, 1.5305, 0.0609), text_encoder=_clip(768, 12, 12, 768, True),
                                    tokenizer=testing.tiny_tokenizer(77),
                                    text_encoder_2=_clip(1280, 32, 20, 1280, True),
                                    tokenizer_2=testing.tiny_tokenizer(77), text_encoder_3=None, tokenizer_3=None)


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5Config, T5EncoderModel

    transformer = denoiser("flux")
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


def denoiser(model: str):
    """The real-shape denoiser of a flow family (random weights; under ``torch.device("meta")`` no memory)."""
    import diffusers

    configs = {
        "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                attention_head_dim=128, num_attention_heads=24,
                                                joint_attention_dim=4096, pooled_projection_dim=768,
                                                guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
        "qwen-image": ("QwenImageTransformer2DModel", {}),  # diffusers' defaults are Qwen-Image's
        "flux2-klein": ("Flux2Transformer2DModel", dict(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                                        joint_attention_dim=3 * 2560, guidance_embeds=False)),
        "z-image": ("ZImageTransformer2DModel", {}),  # diffusers' defaults are Z-Image's
        "wan": ("WanTransformer3DModel", dict(num_attention_heads=12, ffn_dim=8960, num_layers=30)),  # 2.1 1.3B
    }
    name, kwargs = configs[model]
    return getattr(diffusers, name)(**kwargs)


def _chat_text_model(hidden: int, causal_lm: bool = False, layers: int = 2):
    """A narrow Qwen3 of the real width ``hidden`` (2 heads, MLP 256 wide) with ``layers`` layers, over the tiny chat
    tokenizer's vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    from hf_control_ft.testing.families import tiny_chat_tokenizer

    tokenizer = tiny_chat_tokenizer()
    config = Qwen3Config(hidden_size=hidden, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128, vocab_size=len(tokenizer) + 8,
                         max_position_embeddings=2048)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config), tokenizer


def qwen_image_pipeline():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from hf_control_ft.testing.families import tiny_chat_tokenizer

    tokenizer = tiny_chat_tokenizer()
    vocab = len(tokenizer) + 8
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 2, "num_attention_heads": 28,
                     "num_key_value_heads": 4, "vocab_size": vocab, "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 64, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 3584},
        hidden_size=3584, vocab_size=vocab, vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
        image_token_id=vocab - 2, video_token_id=vocab - 1)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift=1.0,
                                                time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=AutoencoderKLQwenImage(), tokenizer=tokenizer,
                             text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
                             transformer=denoiser("qwen-image"))


def flux2_klein_pipeline():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    text_encoder, tokenizer = _chat_text_model(2560, causal_lm=True, layers=28)  # the pipeline reads layers 9 / 18 / 27
    transformer = denoiser("flux2-klein")
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    return Flux2KleinPipeline(scheduler=scheduler, vae=AutoencoderKLFlux2(), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)


def z_image_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    text_encoder, tokenizer = _chat_text_model(2560)
    transformer = denoiser("z-image")
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16, 0.3611, 0.1159),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def wan_pipeline():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = testing.tiny_t5_tokenizer(512)
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                                       num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0))
    transformer = denoiser("wan")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=umt5, transformer=transformer, vae=AutoencoderKLWan(),
                       scheduler=scheduler)


def vae(model: str):
    """The real-shape VAE of ``model`` (random weights)."""
    import diffusers

    if model in ("sd15", "sdxl"):
        return _vae(4, 0.18215 if model == "sd15" else 0.13025, None)
    if model == "sd3":
        return _vae(16, 1.5305, 0.0609)
    if model in ("flux", "z-image"):
        return _vae(16, 0.3611, 0.1159)
    return {"qwen-image": diffusers.AutoencoderKLQwenImage, "flux2-klein": diffusers.AutoencoderKLFlux2,
            "wan": diffusers.AutoencoderKLWan}[model]()


REAL = {"sdxl": sdxl_pipeline, "sd3": sd3_pipeline, "flux": flux_pipeline, "qwen-image": qwen_image_pipeline,
        "flux2-klein": flux2_klein_pipeline, "z-image": z_image_pipeline, "wan": wan_pipeline}


def build_pipeline(model: str, tiny: bool, device: str = "cpu"):
    """The pipeline of ``model`` (a key of :data:`RESOLUTION`): real shapes, or the test size. On a GPU
    the random weights are made there (a 12B transformer initialised on the CPU takes minutes)."""
    if device != "cpu" and not tiny:
        with torch.device(device):
            return build_pipeline(model, tiny, "cpu")
    if tiny:
        from hf_control_ft.testing import families

        return {"sd15": testing.tiny_sd_pipeline, "sdxl": testing.tiny_sdxl_pipeline,
                "sd3": testing.tiny_sd3_pipeline, "flux": testing.tiny_flux_pipeline,
                "qwen-image": families.tiny_qwen_image_pipeline, "flux2-klein": families.tiny_flux2_klein_pipeline,
                "z-image": families.tiny_z_image_pipeline, "wan": families.tiny_wan_pipeline}[model]()
    if model == "sd15":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**testing.sd15_components())
    torch.manual_seed(0)
    return REAL[model]()
