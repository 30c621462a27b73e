"""A tiny SEIKO run whose oracle is people on the rating page (tests/feedback/test_rating.py drives it).

    python rating_child.py OUTPUT_DIR PORT

2 rounds of 4 queries on 16-dimensional samples (shown as 4x4 grey images); raters ``alice`` (token
``alice-token``) and ``bob`` (``bob-token``). Prints ``round N done`` after each round's update.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hf_control_ft.feedback.human_oracle import HumanOracle  # noqa: E402
from hf_control_ft.testing import ddpm, make_mlp_denoiser  # noqa: E402
from hf_control_ft.trainers.seiko import SeikoTrainer  # noqa: E402
from hf_control_ft.trainers.seiko_config import SeikoConfig  # noqa: E402

RATERS = {"alice": "alice-token", "bob": "bob-token"}


def main():
    out, port = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    config = SeikoConfig(num_rounds=2, queries_per_round=4, alpha=1.0, beta=1.0, optimism="ucb", ensemble_size=2,
                         num_inference_steps=4, train_steps=2, batch_size=4, lora_rank=2, value_num_rollouts=8,
                         value_train_steps=3, noise_num_steps=3, noise_train_steps=2, noise_batch_size=8,
                         aux_hidden=16, reward_hidden=8, reward_train_steps=10, report_to=None, output_dir=out,
                         min_answer_fraction=0.25)
    oracle = HumanOracle(out, serve=True, port=port, raters=RATERS, value_range=(-2.0, 2.0), poll_interval=0.1)
    trainer = SeikoTrainer(config, make_mlp_denoiser(dim=16, hidden=16, lora=False), ddpm(), oracle, (16,))
    trainer.train(callback=lambda t, i: print(f"round {i} done", flush=True) or {})
    print("finished", flush=True)


if __name__ == "__main__":
    main()
