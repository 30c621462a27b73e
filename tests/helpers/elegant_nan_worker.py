"""ELEGANT under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo) with a reward that is NaN on
process 1 only, at its 2nd drift step (a rank-local error while process 0 waits in the gradient all-reduce).
Writes ``RESULT_DIR/rankR.json`` only if training ends.

    python elegant_nan_worker.py RESULT_DIR
"""

import json
import os
import sys

import torch

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.core.control import lora_parameters
from hf_control_ft.testing import ddim, make_mlp_denoiser


def main():
    result_dir = sys.argv[1]
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    calls = {"n": 0}

    def reward(x):
        calls["n"] += 1
        r = -x.pow(2).sum(1)
        return torch.full_like(r, float("nan")) if rank == 1 and calls["n"] == 2 else r

    config = ElegantConfig(num_inference_steps=3, train_steps=4, batch_size=4, learn_initial_noise=False,
                           report_to=None, lora_rank=2, drift_objective="pathwise")
    trainer = ElegantTrainer(config, make_mlp_denoiser(lora=False), ddim(), reward, (2,))
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in lora_parameters(trainer.model)])
    everyone = trainer.accelerator.gather(flat[None])
    result = {"rank": trainer.accelerator.process_index, "skipped": trainer.skipped_steps,
              "steps": trainer.global_step, "finite": bool(torch.isfinite(flat).all()),
              "identical": all(torch.equal(everyone[0], row) for row in everyone)}
    with open(os.path.join(result_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
