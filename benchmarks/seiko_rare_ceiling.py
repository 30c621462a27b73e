"""How far one update can move mass on the ``rare`` task when the reward is *known*: the ceiling SEIKO works under.

SEIKO's round fits a reward model and then runs an ELEGANT-style update. On ``benchmarks/seiko_tasks.py``'s
``rare`` task this script skips the feedback entirely: ELEGANT is trained on the exact true reward (no noise, no
reward model, no bonus) at ``alpha = 2`` (SEIKO's round temperature ``alpha + beta`` in
``benchmarks/seiko_feedback.py``), with that benchmark's per-round settings, and its rare-mode weight is compared
with the tilted law's, ``p_pre exp(r / alpha) / Z``, computed by reweighting the pretrained sampler's own samples
(so the target and the model share the same 10-step sampler). If one update cannot move the mass even here,
no bonus can make SEIKO's rounds do it.

    python benchmarks/seiko_rare_ceiling.py [--sampling_steps 10 20] [--objectives pathwise value_guided]
        [--train_steps 30 120] [--seeds 0 1 2] [--set value_num_rollouts=8192]

``--sampling_steps``: the sampler's steps (the task's per-round setting is 10); each has its own tilted law (the
pretrained sampler's own samples reweighted), since a chain of fewer, wider Gaussian steps is a different pretrained
model. With 10 steps the per-step mean shift the drift controls cannot represent the tilt toward a 3 % mode
(``docs/seiko.md``). Prints one JSON line per run and, last, a summary ``{"targets": {steps: {pretrained_rare_weight,
tilted_rare_weight}}, "table": [{sampling_steps, objective, train_steps, rare_mode_weight (mean and 95% interval over
seeds)}], "runs": [...]}``. About 1 minute a run on one core at 10 steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import sys
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_stats import interval  # noqa: E402
from seiko_feedback import UPDATE_SETTINGS  # noqa: E402
from seiko_tasks import RareTask  # noqa: E402

from hf_control_ft.trainers.elegant import ElegantTrainer  # noqa: E402
from hf_control_ft.trainers.elegant_config import ElegantConfig  # noqa: E402
from hf_control_ft.utils.config_cli import parse_flags  # noqa: E402

ALPHA = 2.0  # alpha + beta of benchmarks/seiko_feedback.py


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", nargs="+", default=["pathwise", "value_guided"])
    parser.add_argument("--train_steps", type=int, nargs="+", default=[30, 120])
    parser.add_argument("--sampling_steps", type=int, nargs="+", default=[10, 20],
                        help="the sampler's steps (the task's per-round setting is 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval_n", type=int, default=8192)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="ElegantConfig fields over the per-round settings (value_num_rollouts=4096 ...)")
    args = parser.parse_args(argv)
    task = RareTask()
    task.build()
    fields = task.config_fields()
    overrides, _ = parse_flags({f.name: f for f in dataclasses.fields(ElegantConfig)}, ["--" + s for s in args.set])
    runs, targets = [], {}
    with tempfile.TemporaryDirectory(prefix="seiko_ceiling_") as tmp:
        for sampling_steps, objective, steps, seed in itertools.product(args.sampling_steps, args.objectives,
                                                                        args.train_steps, args.seeds):
            cfg = ElegantConfig(**{
                **dict(alpha=ALPHA, num_inference_steps=sampling_steps, train_steps=steps,
                       batch_size=fields["batch_size"], learning_rate=fields["learning_rate"],
                       lora_rank=fields["lora_rank"], value_num_rollouts=fields["value_num_rollouts"], seed=seed,
                       drift_objective=objective,
                       output_dir=os.path.join(tmp, f"{sampling_steps}-{objective}-{steps}-{seed}"),
                       **UPDATE_SETTINGS), **overrides})
            trainer = ElegantTrainer(cfg, model=copy.deepcopy(task.model), scheduler=task.scheduler,
                                     reward_fn=task.true_reward, sample_shape=task.sample_shape)
            if sampling_steps not in targets:  # the tilted law of this sampler, by reweighting its own samples
                x = trainer.sample(65536, torch.Generator().manual_seed(777), batch_size=8192, controlled=False)
                w = torch.softmax(task.true_reward(x).double() / ALPHA, 0)
                rare = (task.mixture.assign(x) == 2).double()
                targets[sampling_steps] = {"pretrained_rare_weight": round(float(rare.mean()), 4),
                                           "tilted_rare_weight": round(float((w * rare).sum()), 4)}
            trainer.train()
            x = trainer.sample(args.eval_n, torch.Generator().manual_seed(777), batch_size=2048)
            row = {"sampling_steps": sampling_steps, "objective": objective, "train_steps": steps, "seed": seed,
                   **task.evaluate(x)}
            runs.append(row)
            print(json.dumps(row), flush=True)
    table = []
    for (sampling_steps, objective, steps), group in itertools.groupby(
            runs, key=lambda r: (r["sampling_steps"], r["objective"], r["train_steps"])):
        weights = [r["rare_mode_weight"] for r in group]
        table.append({"sampling_steps": sampling_steps, "objective": objective, "train_steps": steps,
                      **targets[sampling_steps], "rare_mode_weight": interval(weights) if len(weights) > 1
                      else round(weights[0], 4)})
    print(json.dumps({"alpha": ALPHA, "targets": targets, "table": table, "runs": runs}))


if __name__ == "__main__":
    main()
