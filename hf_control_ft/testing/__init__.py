"""Stable Diffusion pipelines built from configs with random weights (no network), for tests and benchmarks.

* :func:`tiny_sd_pipeline`: SD 1.x layout (UNet2DConditionModel + AutoencoderKL with 4 latent channels + CLIP
  text encoder) at a size that trains on CPU in seconds: 16x16 images, 8x8x4 latents, 32-dim text embeddings.
* :func:`sd15_components`: the SD 1.5 shapes (860M-parameter UNet, 84M VAE, 123M CLIP ViT-L/14 text encoder)
  with random weights, for compute / memory benchmarks.

* :func:`tiny_sdxl_pipeline`: SDXL layout (two CLIP encoders, added time ids, Euler scheduler) at test size.
* :func:`tiny_sd3_pipeline`: SD3 layout (flow-matching transformer, two CLIP encoders, no T5) at test size.
* :func:`tiny_flux_pipeline`: FLUX layout (packed latents, guidance embedding, CLIP + T5, dynamic shifting).
* :func:`tiny_clip_model`: a random-weight CLIP (the architecture of the aesthetic / PickScore / CLIPScore
  rewards).
* :func:`tiny_vlm`: a random-weight LLaVA (CLIP vision tower + Llama) with its processor and chat template, for
  the VLM-as-judge reward.

The tokenizer is a CLIP BPE tokenizer over single letters, built in memory.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..core.control import add_lora_control, lora_parameters
from ..models.networks import MLPDenoiser


def tiny_tokenizer(model_max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (+ word-end forms) and two merges."""
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in string.ascii_lowercase:
        tokens += [c, c + "</w>"]
    tokens += ["th", "the</w>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [("t", "h"), ("th", "e</w>")]  # transformers 5: merges are tuples
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_clip_model(seed: int = 0, projection_dim: int = 16) -> tuple[CLIPModel, CLIPTokenizer]:
    """A random-weight ``CLIPModel`` (ViT on 32x32 images, 2-layer text tower) and its in-memory tokenizer: the
    architecture of the CLIP-based rewards (aesthetic, PickScore, CLIPScore) at test size."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=projection_dim),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, projection_dim=projection_dim),
        projection_dim=projection_dim)
    return CLIPModel(config).eval(), tokenizer


VLM_WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "user", "assistant", ":", "Yes", "yes", "No", "no", "does",
             "this", "figure", "show", "please", "answer", "or", "a", "cat", "red", "car", "the", "sea", "?", ".", '"']
_VLM_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def tiny_vlm(seed: int = 0):
    """``(model, processor)``: a random-weight ``LlavaForConditionalGeneration`` (16x16 images, 8-pixel patches,
    one Llama layer) and a ``LlavaProcessor`` whose word-level tokenizer, image processor and chat template are
    built in memory (the words of :data:`VLM_WORDS`; punctuation must stand apart, as in ``"a cat ?"``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VLM_WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                  crop_size={"height": 16, "width": 16}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=_VLM_TEMPLATE, num_additional_image_tokens=1)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(VLM_WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=3, bos_token_id=1, eos_token_id=2),
        image_token_index=VLM_WORDS.index("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config).eval(), processor


def tiny_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    return _components(unet, vae, text_encoder, tokenizer)


def _components(unet, vae, text_encoder, tokenizer) -> dict:
    """``StableDiffusionPipeline`` keyword arguments with SD's noise schedule on a DDIM scheduler, no safety checker."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd15_components(seed: int = 0) -> dict:
    """SD 1.5-shaped UNet / VAE / text encoder (random weights), DDIM scheduler with SD's noise schedule."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tokenizer = tiny_tokenizer(model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=768))
    return _components(unet, vae, text_encoder, tokenizer)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**tiny_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` with random weights: 1-block SD3 transformer (joint attention, patch 1) on
    8x8x4 latents (16x16 images), two tiny CLIP encoders with projections (pooled 2 x 32), no T5
    (``text_encoder_3=None``), a VAE with ``shift_factor``, ``FlowMatchEulerDiscreteScheduler(shift=3)``."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    text = dict(vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                projection_dim=32)
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**text)) for _ in range(2)]
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=16, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tiny_tokenizer(),
                                    text_encoder_2=encoders[1], tokenizer_2=tiny_tokenizer(), text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` with random weights: a UNet with ``text_time`` added conditioning on
    8x8x4 latents (16x16 images), two tiny CLIP encoders (the second with a 32-dim projection), SD's noise schedule
    on an ``EulerDiscreteScheduler`` as SDXL ships it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    text = dict(vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                projection_dim=32)
    components = tiny_components(seed)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=components["vae"], text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
                                     tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
                                     scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_unet_output(unet, seed: int = 1) -> torch.Tensor:
    """The tiny SDXL UNet's prediction on fixed random inputs (a fingerprint for comparing adapters)."""
    g = torch.Generator().manual_seed(seed)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).expand(2, -1)
    with torch.no_grad():
        return unet(x, torch.tensor([700, 300]), encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def tiny_t5_tokenizer(model_max_length: int = 16):
    """A T5 (Unigram) tokenizer over a few words and single letters, built in memory."""
    from transformers import T5Tokenizer

    words = ["a", "the", "cat", "dog", "red", "car", "sea", "blue"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [(c, -3.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_flux_pipeline(seed: int = 0):
    """A ``FluxPipeline`` with random weights: 1 double- + 1 single-stream block with a guidance embedding on
    8x8x4 latents packed to 16 tokens of 16 channels (16x16 images), a tiny CLIP and a tiny T5 encoder with an
    in-memory tokenizer, a dynamically shifting ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    t5_tokenizer = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=16, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tiny_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_transformer_output(transformer, seed: int = 1) -> torch.Tensor:
    """The tiny FLUX transformer's velocity on fixed random packed inputs: a fingerprint for comparing adapters."""
    g = torch.Generator().manual_seed(seed)
    x, emb = torch.randn(2, 16, 16, generator=g), torch.randn(2, 8, 32, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    img_ids = torch.zeros(4, 4, 3)
    img_ids[..., 1] += torch.arange(4)[:, None]
    img_ids[..., 2] += torch.arange(4)[None, :]
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([0.7, 0.3]), guidance=torch.full((2,), 3.5),
                           pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=torch.zeros(8, 3),
                           img_ids=img_ids.reshape(-1, 3), return_dict=False)[0]


def tiny_sd3_transformer_output(transformer, seed: int = 1) -> torch.Tensor:
    """The tiny SD3 transformer's velocity on fixed random inputs: a fingerprint for comparing adapters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb, pooled = torch.randn(2, 32, 32, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([700.0, 300.0]), encoder_hidden_states=emb,
                           pooled_projections=pooled, return_dict=False)[0]


def tiny_unet_output(unet, seed: int = 1) -> torch.Tensor:
    """The tiny UNet's prediction on a fixed random latent batch, text embedding and timesteps: a fingerprint
    for comparing adapters exactly (``torch.equal``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([700, 300]), encoder_hidden_states=emb).sample


def scale_lora(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Sets every LoRA ``B`` matrix to ``scale * N(0, 1)`` (``A`` keeps its initialisation): a control of known
    size, identical across trainers built with the same seed."""
    from ..core.control import tuner_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in tuner_layers(model):
            for name, b in sorted(layer.lora_B.items()):
                b.weight.copy_(scale * torch.randn(b.weight.shape, generator=g).to(b.weight))


def kl_and_gradient(trainer, batch_size: int = 2, seed: int = 0) -> tuple[float, float]:
    """``(mean path KL per sample, norm of its LoRA gradient)`` of ``trainer``'s fine-tuned chain from ``N(0, I)``
    with fixed prompts / noise (``seed``): the quantities whose precision ``benchmarks/kl_precision.py``
    compares between precision modes."""
    from ..core.control import lora_parameters

    gen = torch.Generator().manual_seed(seed)
    trainer.process.prepare_batch(batch_size, gen)
    x_T = torch.randn((batch_size, *trainer.sample_shape), generator=gen).to(trainer.device)
    traj = trainer.sampler.rollout(x_T, gen)
    params = lora_parameters(trainer.model)
    for p in params:
        p.grad = None
    trainer.sampler.backpropagate(traj, torch.zeros_like(traj.samples), 1.0 / batch_size)
    grad = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    return float(traj.kl.mean()), float(grad)


def make_mlp_denoiser(dim=2, hidden=32, depth=2, seed=0, lora=True, perturb=0.0):
    """A random-weight MLP denoiser with a LoRA control adapter; ``perturb`` > 0 makes the control non-zero."""
    torch.manual_seed(seed)
    model = MLPDenoiser(dim=dim, hidden=hidden, depth=depth)
    if lora:
        add_lora_control(model, rank=4)
        if perturb:
            g = torch.Generator().manual_seed(seed + 100)
            with torch.no_grad():
                for p in lora_parameters(model):
                    p.add_(perturb * torch.randn(p.shape, generator=g))
    return model


def ddim(**kw) -> DDIMScheduler:
    """A 1000-step DDIM scheduler without clipping."""
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **kw)


def ddpm(**kw) -> DDPMScheduler:
    """A 1000-step DDPM scheduler without clipping."""
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **kw)


__all__ = ["tiny_tokenizer", "tiny_clip_model", "tiny_vlm", "tiny_components", "sd15_components", "tiny_sd_pipeline",
           "tiny_sd3_pipeline", "tiny_sdxl_pipeline", "tiny_sdxl_unet_output", "tiny_t5_tokenizer",
           "tiny_flux_pipeline", "tiny_flux_transformer_output", "tiny_sd3_transformer_output", "tiny_unet_output",
           "scale_lora", "kl_and_gradient", "make_mlp_denoiser", "ddim", "ddpm"]
