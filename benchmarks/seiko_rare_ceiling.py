"""How far one update can move mass on the ``rare`` task when the reward is *known*: the ceiling SEIKO works under.

SEIKO's round fits a reward model and then runs an ELEGANT-style update. On ``benchmarks/seiko_tasks.py``'s
``rare`` task this script skips the feedback entirely: ELEGANT is trained on the exact true reward (no noise, no
reward model, no bonus) at ``alpha = 2`` (SEIKO's round temperature ``alpha + beta`` in
``benchmarks/seiko_feedback.py``), with that benchmark's per-round settings, and its rare-mode weight is compared
with the tilted law's, ``p_pre exp(r / alpha) / Z``, computed by reweighting the pretrained sampler's own samples
(so the target and the model share the same 10-step sampler). If one update cannot move the mass even here,
no bonus can make SEIKO's rounds do it.

    python benchmarks/seiko_rare_ceiling.py [--objectives pathwise value_guided] [--train_steps 30 120]

Prints one JSON line per run and, last, a summary line ``{"pretrained_rare_weight", "tilted_rare_weight",
"runs": [{objective, train_steps, rare_mode_weight, true_reward, feasible}]}``. About 1 minute on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from seiko_feedback import UPDATE_SETTINGS  # noqa: E402
from seiko_tasks import RareTask  # noqa: E402

from hf_control_ft.trainers.elegant import ElegantTrainer  # noqa: E402
from hf_control_ft.trainers.elegant_config import ElegantConfig  # noqa: E402

ALPHA = 2.0  # alpha + beta of benchmarks/seiko_feedback.py


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", nargs="+", default=["pathwise", "value_guided"])
    parser.add_argument("--train_steps", type=int, nargs="+", default=[30, 120])
    args = parser.parse_args(argv)
    task = RareTask()
    task.build()
    fields = task.config_fields()
    runs, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="seiko_ceiling_") as tmp:
        for objective in args.objectives:
            for steps in args.train_steps:
                cfg = ElegantConfig(alpha=ALPHA, num_inference_steps=fields["num_inference_steps"],
                                    train_steps=steps, batch_size=fields["batch_size"],
                                    learning_rate=fields["learning_rate"], lora_rank=fields["lora_rank"],
                                    value_num_rollouts=fields["value_num_rollouts"], seed=0,
                                    drift_objective=objective, output_dir=os.path.join(tmp, f"{objective}-{steps}"),
                                    **UPDATE_SETTINGS)
                trainer = ElegantTrainer(cfg, model=copy.deepcopy(task.model), scheduler=task.scheduler,
                                         reward_fn=task.true_reward, sample_shape=task.sample_shape)
                if not summary:
                    x = trainer.sample(16384, torch.Generator().manual_seed(777), batch_size=2048, controlled=False)
                    w = torch.softmax(task.true_reward(x).double() / ALPHA, 0)
                    rare = (task.mixture.assign(x) == 2).double()
                    summary = {"pretrained_rare_weight": float(rare.mean()),
                               "tilted_rare_weight": float((w * rare).sum())}
                trainer.train()
                x = trainer.sample(fields["eval_n"], torch.Generator().manual_seed(777), batch_size=1024)
                row = {"objective": objective, "train_steps": steps, **task.evaluate(x)}
                runs.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({**summary, "alpha": ALPHA, "runs": runs}))


if __name__ == "__main__":
    main()
