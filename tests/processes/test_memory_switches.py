"""Memory switches (``pre_compute_text_embeddings``, ``offload``, ``enable_vae_slicing``, ``allow_tf32``) change
where things live, never a number the trainer computes."""

import pytest
import torch

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.processes.memory import EmbeddingCache, on_device, tf32_matmuls, text_encoders
from hf_control_ft.testing import kl_and_gradient, scale_lora, tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from hf_control_ft.testing.families import TINY_OPTIONS

PROMPTS = ["a cat", "a red car", "the sea"]


def _trainer(make, **options):
    cfg = ElegantConfig(alpha=1.0, eta=1.0, num_inference_steps=3, learn_initial_noise=False, batch_size=2,
                        report_to=None, lora_rank=4)
    if make is tiny_flux_pipeline:
        options = {**TINY_OPTIONS["flux"], **options}
    trainer = ElegantTrainer.from_pipeline(make(), None, cfg, prompts=PROMPTS, **options)
    scale_lora(trainer.model, 0.1)
    return trainer


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_flux_pipeline])
def test_switches_leave_the_kl_and_gradient_unchanged(make):
    reference = kl_and_gradient(_trainer(make))
    assert reference[0] > 1e-3  # a control the switches could change
    switched = _trainer(make, pre_compute_text_embeddings=True, offload=True, enable_vae_slicing=True)
    calls = []
    encode = switched.process.encode
    switched.process.encode = lambda prompts, pooled=False: calls.append(list(prompts)) or encode(prompts, pooled)
    assert kl_and_gradient(switched) == pytest.approx(reference, rel=1e-5)
    assert sorted(calls[0]) == sorted(PROMPTS)  # every prompt encoded once, before the first batch
    kl_and_gradient(switched, seed=1)
    assert [c for c in calls[1:] if c != [""]] == [] and len(switched.process._cache) == 3  # then the cache
    assert switched.process.pipeline.vae.use_slicing
    assert all(next(e.parameters()).device.type == "cpu" for e in text_encoders(switched.process.pipeline))
    images = torch.rand(3, 4, 2, 2)  # decode with slicing equals the batch decode
    vae = switched.process.pipeline.vae
    with torch.no_grad():
        sliced = vae.decode(images).sample
        vae.disable_slicing()
        assert torch.allclose(sliced, vae.decode(images).sample, atol=1e-5)


def test_flux_text_ids_are_kept_once_not_per_prompt():
    cache = EmbeddingCache((True, True, False))
    ids = torch.zeros(2, 3)  # (L, 3) with L equal to the number of prompts: still one tensor for any batch
    cache.add(["a", "b"], (torch.ones(2, 4, 5), torch.ones(2, 6), ids))
    embeds, pooled, got = cache.get(["b", "a", "b"], "cpu")
    assert embeds.shape == (3, 4, 5) and pooled.shape == (3, 6) and torch.equal(got, ids)


def test_kl_passes_keep_full_fp32_when_tf32_is_allowed_elsewhere():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        trainer = _trainer(tiny_sd_pipeline)
        with trainer.process.kl_context()():
            assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
        with tf32_matmuls(False):
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_kl_precision_tf32_turns_tf32_on_in_the_kl_passes_only():
    """``kl_precision="tf32"``: TF32 in the KL passes (the GPU's tensor-core path) and, through the global switches
    it turns on, in the backward sweep; on a CPU (no TF32) its KL and gradient equal ``"upcast"``'s exactly."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        upcast = _trainer(tiny_sd_pipeline, mixed_precision="bf16", kl_precision="upcast")
        with upcast.process.kl_context()():
            assert torch.backends.cuda.matmul.allow_tf32 is False
        tf32 = _trainer(tiny_sd_pipeline, mixed_precision="bf16", kl_precision="tf32")
        assert torch.backends.cuda.matmul.allow_tf32 is True  # the backward sweep's matmuls too
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with tf32.process.kl_context()():
            assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert tf32.process.lora_model.dtype == upcast.process.lora_model.dtype == torch.bfloat16
        scale_lora(tf32.process.lora_model, 0.05)
        scale_lora(upcast.process.lora_model, 0.05)
        assert kl_and_gradient(tf32) == kl_and_gradient(upcast)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_on_device_brings_modules_back_to_the_cpu():
    module = torch.nn.Linear(2, 2)
    moves = []
    original = module.to
    module.to = lambda *a, **k: moves.append(a[0]) or original(*a, **k)
    with on_device([module], "cpu"):
        pass
    with on_device([module], "cpu", enabled=False):
        pass
    assert moves == ["cpu", "cpu"]
