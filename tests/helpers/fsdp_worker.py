"""Run by tests/trainers/test_fsdp.py under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo).

On the tiny Stable Diffusion pipeline (a UNet with down / up block lists, classifier-free guidance), each rank
builds a trainer with ``fsdp=True`` (its frozen UNet sharded) and one without, same seed:

1. the drift gradient of each rank's own batch, sharded against unsharded on the same samples;
2. the averaged gradient of the sharded run against one process's gradient of both ranks' batches together;
3. two training steps of the sharded trainer, then ``save_pretrained``: the LoRA equal on both ranks and the saved
   file holding all of it at its full shapes.

Writes ``rank<N>.json`` to ``RESULT_DIR``.
"""

import json
import os
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.core.control import lora_parameters, lora_state_dict
from hf_control_ft.testing import scale_lora, tiny_sd_pipeline


def brightness(images, prompts=None):
    return images.float().mean(dim=(1, 2, 3))


def build(accelerator, fsdp, **overrides):
    cfg = ElegantConfig(**{**dict(alpha=1.0, eta=1.0, num_inference_steps=4, learn_initial_noise=False, batch_size=2,
                                  report_to=None, lora_rank=4, drift_objective="pathwise", seed=0,
                                  learning_rate=1e-3, fsdp=fsdp), **overrides})
    trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), brightness, cfg, prompts=["a cat", "a red car", "a dog"],
                                           accelerator=accelerator, guidance_scale=7.5)
    scale_lora(trainer.model, 0.05)
    return trainer


def gradient(trainer, seed, weight):
    """Adds the LoRA gradient of ``weight * mean(-r + alpha KL)`` over a batch of 2 drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    trainer.process.prepare_batch(2, gen)
    x_T = torch.randn((2, *trainer.sample_shape), generator=gen)
    traj = trainer.sampler.rollout(x_T, gen)
    _, dr = trainer.reward_and_gradient(traj.samples)
    trainer.sampler.backpropagate(traj, -weight * dr / 2, weight * trainer.config.alpha / 2)


def flat_grad(trainer):
    return torch.cat([p.grad.flatten() for p in lora_parameters(trainer.model)])


def main():
    accelerator = Accelerator(cpu=True)
    rank, out = accelerator.process_index, sys.argv[1]
    sharded, plain = build(accelerator, True), build(accelerator, False)
    unet = sharded.process.lora_model
    frozen = [p for n, p in unet.named_parameters() if ".lora_" not in n]
    result = {"rank": rank, "sharded": sharded.sharded, "plain_sharded": plain.sharded,
              "frozen_dtensors": all(isinstance(p, DTensor) for p in frozen),
              "lora_plain_tensors": not any(isinstance(p, DTensor) for p in lora_parameters(sharded.model)),
              "local_fraction": sum(p.to_local().numel() for p in frozen) / sum(p.numel() for p in frozen)}

    # 1. this rank's batch, sharded vs unsharded
    gradient(sharded, 100 + rank, 1.0)
    gradient(plain, 100 + rank, 1.0)
    own_sharded, own_plain = flat_grad(sharded), flat_grad(plain)
    result["own_rel_err"] = float((own_sharded - own_plain).norm() / own_plain.norm())
    # 2. averaged over the ranks vs one process with both batches
    sharded._sync_grads(lora_parameters(sharded.model))
    for p in lora_parameters(plain.model):
        p.grad = None
    for seed in (100, 101):
        gradient(plain, seed, 0.5)
    averaged, one_process = flat_grad(sharded), flat_grad(plain)
    result["averaged_rel_err"] = float((averaged - one_process).norm() / one_process.norm())
    result["grad_norm"] = float(one_process.norm())

    # 3. training and saving under FSDP
    trainer = build(accelerator, True, train_steps=2, output_dir=os.path.join(out, "run"), checkpointing_steps=1)
    before = torch.cat([p.detach().flatten() for p in lora_parameters(trainer.model)])
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in lora_parameters(trainer.model)])
    everyone = accelerator.gather(flat[None])
    result["identical"] = all(torch.equal(everyone[0], row) for row in everyone)
    result["moved"] = float((flat - before).norm())
    trainer.save_pretrained(os.path.join(out, "saved"))
    accelerator.wait_for_everyone()
    saved = load_file(os.path.join(out, "saved", "pytorch_lora_weights.safetensors"))
    weights = lora_state_dict(trainer.model)
    result["saved_tensors"], result["lora_tensors"] = len(saved), len(weights)
    by_shape = sorted(tuple(t.shape) for t in saved.values()) == sorted(tuple(t.shape) for t in weights.values())
    result["saved_full_shapes"] = by_shape
    result["saved_equal"] = sorted(float(t.float().norm()) for t in saved.values()) == \
        sorted(float(t.float().norm()) for t in weights.values())
    with open(os.path.join(os.environ["RESULT_DIR"], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
