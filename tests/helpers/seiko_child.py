"""A tiny SEIKO run shared by tests/test_seiko.py and the child process it SIGKILLs.

    python tests/seiko_child.py OUTPUT_DIR ANSWER_LOG [BLOCK_FILE]

``ANSWER_LOG`` gets one JSON line per answered sample; with ``BLOCK_FILE`` the oracle, when asked for the second
batch of round 2, creates ``BLOCK_FILE`` and blocks (the parent then kills the process).
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hf_control_ft.testing import ddpm, make_mlp_denoiser  # noqa: E402
from hf_control_ft.trainers.seiko import SeikoTrainer  # noqa: E402
from hf_control_ft.trainers.seiko_config import SeikoConfig  # noqa: E402

PEAK = torch.tensor([1.5, -1.0])


def tiny_config(output_dir, **kw):
    values = dict(num_rounds=3, queries_per_round=[12, 12, 8], alpha=1.0, beta=1.0, optimism="ucb", bonus_scale=0.5,
                  ensemble_size=2, num_inference_steps=4, eta=1.0, train_steps=2, batch_size=8, lora_rank=2,
                  value_num_rollouts=16, value_train_steps=5, noise_num_steps=3, noise_train_steps=2,
                  noise_batch_size=8, aux_hidden=16, reward_hidden=8, reward_train_steps=20, oracle_batch_size=5,
                  report_to=None, output_dir=str(output_dir), log_every=1,
                  # the oracle below fails deterministically for some samples: asking them again cannot help, and
                  # the crash tests count every sample sent exactly once
                  oracle_max_attempts=1, min_answer_fraction=0.3)
    values.update(kw)
    return SeikoConfig(**values)


class LoggingOracle:
    """Noisy true reward ``-||x - PEAK||^2`` (deterministic per sample), NaN (a failed query) for about a quarter of the samples (chosen by
    the digits of ``x_0``); logs every answered sample."""

    def __init__(self, log_path, block_file=None):
        self.log_path, self.block_file = log_path, block_file
        self.calls = 0
        self.__name__ = "logging_oracle"

    def __call__(self, samples, prompts):
        self.calls += 1
        if self.block_file is not None and self.calls == 5:  # round 1: 3 batches (12 / 5); this is round 2's 2nd
            with open(self.block_file, "w") as f:
                f.write("blocked\n")
            while True:
                time.sleep(1)
        # "noise" that is a function of the sample: a resumed run gets the answers the uninterrupted run got
        values = -(samples - PEAK).pow(2).sum(1) + 0.01 * torch.sin(1000 * samples[:, 1])
        values[(samples[:, 0].abs() * 1000).long() % 4 == 0] = float("nan")
        with open(self.log_path, "a") as f:
            for x in samples.tolist():
                f.write(json.dumps(x) + "\n")
        return values


def build_trainer(output_dir, oracle, accelerator=None, **kw):
    return SeikoTrainer(config=tiny_config(output_dir, **kw), model=make_mlp_denoiser(lora=False, hidden=16),
                        scheduler=ddpm(), oracle=oracle, sample_shape=(2,), accelerator=accelerator)


if __name__ == "__main__":
    out, log = sys.argv[1], sys.argv[2]
    block = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    build_trainer(out, LoggingOracle(log, block)).train()
