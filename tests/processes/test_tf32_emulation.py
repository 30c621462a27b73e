"""``kl_precision="tf32"`` measured without a GPU: the emulation rounds every linear / convolution input to TF32's
10-bit mantissa (forward and backward), the KL floor it leaves is far below bf16 autocast's, and at a control
with a KL of two nats the error against the exact KL of the same stored weights is about 1 % (more than the 1 %
goal of the exact modes: "tf32" is the fast mode, not the exact one). The figures behind
the README's "Numerics" rows (``benchmarks/kl_precision.py --modes ... bf16-tf32-emulated``)."""

import torch

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.processes.upcast import round_tf32
from hf_control_ft.testing import kl_and_gradient, scale_lora, tiny_sd_pipeline


def test_round_tf32_keeps_ten_mantissa_bits():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.randint(-6, 6, (10_000,))
    r = round_tf32(x)
    assert torch.all((r - x).abs() <= x.abs() * 2.0**-11 * (1 + 1e-6))  # to nearest: half a unit of 2^-10
    assert torch.equal(round_tf32(r), r)
    half = x.to(torch.bfloat16).float()  # half-precision weights are exact in TF32
    assert torch.equal(round_tf32(half), half) and torch.equal(round_tf32(x.half().float()), x.half().float())
    assert (r != x).float().mean() > 0.99


def _kl(mixed, kl_precision, scale, emulate=False, round_unet=False):
    pipe = tiny_sd_pipeline()
    if round_unet:  # the stored bf16 values held in fp32: the exact KL of the model "bf16" stores
        pipe.unet.to(torch.bfloat16).to(torch.float32)
    cfg = ElegantConfig(alpha=1.0, eta=1.0, num_inference_steps=10, learn_initial_noise=False, batch_size=2,
                        report_to=None, lora_rank=4)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        trainer = ElegantTrainer.from_pipeline(pipe, None, cfg, prompts=["a cat", "a red car"], guidance_scale=7.5,
                                               mixed_precision=mixed, kl_precision=kl_precision)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    if emulate:
        trainer.process.model.upcast.emulate_tf32 = True
    scale_lora(trainer.model, scale)
    return kl_and_gradient(trainer)


def test_emulated_tf32_floor_is_far_below_autocast_and_its_error_small_at_a_few_nats():
    floor_tf32, _ = _kl("bf16", "tf32", 1e-4, emulate=True)
    floor_autocast, _ = _kl("bf16", "autocast", 1e-4)
    exact_floor, _ = _kl("bf16", "fp32", 1e-4, round_unet=True)
    assert exact_floor < 1e-3 * floor_autocast
    assert floor_tf32 < 0.01 * floor_autocast  # measured: 8.0e-3 vs 3.1 nats per sample
    assert floor_tf32 > 10 * exact_floor  # but a floor all the same: TF32 is not the exact mode
    kl, grad = _kl("bf16", "tf32", 0.03, emulate=True)
    kl_exact, grad_exact = _kl("bf16", "fp32", 0.03, round_unet=True)
    assert kl_exact > 1.0
    print(f"tf32 (emulated) at {kl_exact:.3f} nats: KL error {abs(kl / kl_exact - 1):.4f}, gradient "
          f"{abs(grad / grad_exact - 1):.4f}")
    assert abs(kl / kl_exact - 1) < 0.02 and abs(grad / grad_exact - 1) < 0.02  # measured: 1.25 % and 0.3 %
