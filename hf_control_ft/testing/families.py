"""Tiny random-weight pipelines of the newer flow-matching families, built from configs in memory (no network), as
diffusers' own pipeline tests build their dummy components:

* :func:`tiny_z_image_pipeline`: ``ZImagePipeline`` (Qwen3 text encoder with a chat template, list-input
  transformer, ``AutoencoderKL`` with a shift factor).
* :func:`tiny_qwen_image_pipeline`: ``QwenImagePipeline`` (Qwen2.5-VL text encoder with the pipeline's template,
  packed latents, the 3-D ``AutoencoderKLQwenImage`` with per-channel latent statistics).
* :func:`tiny_flux2_klein_pipeline`: ``Flux2KleinPipeline`` (Qwen3 hidden states of several layers, patchified and
  batch-normalised latents, 4-D position ids).
* :func:`tiny_wan_pipeline`: ``WanPipeline`` (T5 encoder, 3-D transformer, the causal video VAE): 16x16 videos of
  5 frames.

The chat models' tokenizer (:func:`tiny_chat_tokenizer`) is byte-level BPE without merges (one token per byte) with
Qwen's special tokens and chat template. Each ``*_output`` function is a fingerprint: the network's output on fixed
random inputs, for checking that an adapter loaded elsewhere reproduces the trained network.
"""

from __future__ import annotations

import torch

#: Qwen's chat template, reduced to what the pipelines use (``enable_thinking`` is accepted and ignored)
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_tokenizer():
    """A byte-level BPE tokenizer without merges (vocabulary: the 256 bytes + ``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>``) with Qwen's chat template and right padding, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def _shifting_scheduler(max_shift: float):
    """A dynamically shifting flow scheduler scaled to the tiny pipelines' sequence lengths (16 to 256 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
                                           base_shift=0.5, max_shift=max_shift)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vocab_size(tokenizer) -> int:
    return len(tokenizer) + 8


def tiny_z_image_pipeline(seed: int = 0):
    """A ``ZImagePipeline`` with random weights: a 1-layer (+1 refiner) transformer on 4x4 patches of 2x2 over 8x8x16
    latents (16x16 images... 32x32 with this VAE's scale 4), a 2-layer Qwen3 encoder, a shifting scheduler."""
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = tiny_chat_tokenizer()
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[512, 32, 32])
    with torch.no_grad():  # torch.empty in the model: fixed, as diffusers' tests do
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                        latent_channels=16, norm_num_groups=16, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          vocab_size=_vocab_size(tokenizer), max_position_embeddings=512))
    scheduler = _shifting_scheduler(1.15)
    return _quiet(ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 transformer=transformer))


def tiny_z_image_output(transformer, seed: int = 1) -> torch.Tensor:
    """The tiny Z-Image transformer's output on fixed random inputs (two samples, captions of 5 and 3 tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]
    caps = [torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g)]
    with torch.no_grad():
        out = transformer(x, torch.tensor([0.3, 0.7]), caps, return_dict=False)[0]
    return torch.stack(out)


def tiny_qwen_image_pipeline(seed: int = 0):
    """A ``QwenImagePipeline`` with random weights: a 1-block transformer on 8x8x4 latents packed to 16 tokens (32x32
    images; the 3-D VAE's scale is 4), a 2-layer Qwen2.5-VL text encoder, a dynamically shifting scheduler."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = tiny_chat_tokenizer()
    vocab = _vocab_size(tokenizer)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                 latents_std=[1.5, 0.8, 1.0, 2.0])
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": vocab, "rope_theta": 1000000.0,
                     "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=vocab, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
        image_token_id=vocab - 2, video_token_id=vocab - 1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = _shifting_scheduler(0.9)
    return _quiet(QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    transformer=transformer))


def tiny_qwen_image_output(transformer, seed: int = 1) -> torch.Tensor:
    """The tiny Qwen-Image transformer's output on fixed random packed inputs (16 tokens, 6 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    x, emb = torch.randn(2, 16, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=emb, timestep=torch.tensor([0.7, 0.3]),
                           img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """A ``Flux2KleinPipeline`` with random weights: 1 double- + 1 single-stream block on 8x8x4 latents patchified to
    4x4x16 (16 tokens; 16x16 images), a 28-layer width-16 Qwen3 whose layers 9, 18, 27 are the prompt embedding (the
    pipeline's default), a dynamically shifting scheduler. ``is_distilled``: klein's distilled variant (no CFG)."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_chat_tokenizer()
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=28,
                                                num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                                vocab_size=_vocab_size(tokenizer), max_position_embeddings=512))
    vae = AutoencoderKLFlux2(sample_size=16, in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                             up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 16), layers_per_block=1,
                             latent_channels=4, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # latent statistics other than (0, 1), so that decoding is seen to undo them
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    scheduler = _shifting_scheduler(1.15)
    return _quiet(Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                     transformer=transformer, is_distilled=is_distilled))


def tiny_flux2_output(transformer, seed: int = 1) -> torch.Tensor:
    """The tiny FLUX.2 transformer's output on fixed random packed inputs (16 image tokens, 6 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    x, emb = torch.randn(2, 16, 16, generator=g), torch.randn(2, 6, 48, generator=g)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(6))
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=emb, timestep=torch.tensor([0.7, 0.3]),
                           img_ids=img_ids.expand(2, -1, -1), txt_ids=txt_ids.expand(2, -1, -1),
                           return_dict=False)[0]


def tiny_wan_pipeline(seed: int = 0):
    """A ``WanPipeline`` with random weights: a 1-block 3-D transformer on 16-channel latents of 2 frames x 4x4
    (videos of 5 frames of 32x32; the VAE's scales are 4 in time and 8 in space), a tiny UMT5 encoder with an
    in-memory tokenizer, a flow scheduler with Wan's shift."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from . import tiny_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return _quiet(WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0)))


def tiny_wan_output(transformer, seed: int = 1) -> torch.Tensor:
    """The tiny Wan transformer's output on fixed random inputs (2 latent frames of 4x4, 8 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    x, emb = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        return transformer(x, torch.tensor([700.0, 300.0]), emb, return_dict=False)[0]


#: the ``from_pipeline`` size options each tiny pipeline is meant to run at (families not named: their defaults are
#: tiny already). FLUX.1 needs one: at its default 1024 px the tiny transformer runs 4096 tokens and the dynamic shift
#: scaled to 16-256 tokens (mu 11.5) holds every level above 0.9999, where a control does nothing (KL ~3e-8)
TINY_OPTIONS = {"flux": dict(height=32, width=32, max_sequence_length=8), "qwen-image": dict(height=32, width=32),
                "flux2-klein": dict(height=16, width=16, max_sequence_length=32),
                "z-image": dict(height=16, width=16, max_sequence_length=64),
                "wan": dict(height=32, width=32, num_frames=5, max_sequence_length=16)}


def tiny_pipelines() -> dict:
    """Every family's tiny pipeline builder by family name (the precision tests run each mode on all of them)."""
    from . import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

    return {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline,
            "qwen-image": tiny_qwen_image_pipeline, "flux2-klein": tiny_flux2_klein_pipeline,
            "z-image": tiny_z_image_pipeline, "wan": tiny_wan_pipeline}


__all__ = ["tiny_wan_pipeline", "tiny_wan_output", "tiny_chat_tokenizer", "tiny_flux2_klein_pipeline", "tiny_flux2_output",
           "tiny_z_image_pipeline", "tiny_z_image_output", "tiny_qwen_image_pipeline", "tiny_qwen_image_output",
           "tiny_pipelines", "TINY_OPTIONS"]
