"""SEIKO: online fine-tuning from a noisy, expensive oracle, with a persistent feedback dataset.

    accelerate launch examples/train_seiko.py --config examples/configs/seiko_digits.yaml \\
        [--target_digit 3] [--optimism bootstrap --num_rounds 3 ...]
    accelerate launch examples/train_seiko.py --task mixture \\
        --config examples/configs/seiko_mixture.yaml

``--task digits`` (default): the embedded 8x8 digits model (``hf_control_ft.tasks.digits``). The oracle is the
*genuine* classifier's ``log p(target | x)`` plus Gaussian noise (``--oracle_noise``), called without gradients:
SEIKO only learns from its answers (the trainer never sees the proxy classifier). The reward heads work on the
raw 64 pixels, or with ``--features proxy`` on the frozen proxy classifier's penultimate layer (an example of a
pluggable image embedding). Reported after training: the genuine and proxy rewards, the genuine target rate and
diversity of the samples before and after (``hf_control_ft.tasks.digits.digits_metrics``).

``--task mixture``: the 2-D Gaussian mixture of ``benchmarks/seiko_feedback.py`` (rare mode next to an
off-manifold reward peak), with true reward, feasibility (within 3 std of a mode) and rare-mode weight.

Any ``--key value`` after the known arguments overrides a ``SeikoConfig`` field. Everything lives in the config's
``output_dir``: ``feedback/`` (the dataset, persisted after every oracle batch), ``trainer_state/`` (resumable
state after every round), ``logs/`` (trackers), ``final/`` (the adapter in the ELEGANT format), sample grids and
``metrics.json``. Killing the script and re-running the same command resumes where it stopped, without asking
the oracle again for any answer it already gave. ``--oracle_fail_rate`` makes a random fraction of the oracle
calls fail (to see the failure policy at work). ``--push_to_hub --hub_model_id REPO`` uploads the model and
``--feedback_dataset_id REPO`` the feedback dataset (token from ``hf auth login``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from hf_control_ft.trainers.seiko import SeikoTrainer
from hf_control_ft.trainers.seiko_config import SeikoConfig
from hf_control_ft.utils.config_cli import format_help

MIXTURE_PEAK = torch.tensor([0.0, 7.5])
MIXTURE_MODE_STD = 0.5


class NoisyOracle:
    """Wraps a true score ``score(x) -> (B,)``: returns ``score + N(0, noise^2)`` as plain floats (no gradient);
    about ``fail_rate`` of the answers are NaN, i.e. failed queries that the trainer records as failed."""

    def __init__(self, score, noise_std: float, fail_rate: float = 0.0, seed: int = 0, name: str = "noisy_oracle"):
        self.score, self.noise_std, self.fail_rate = score, noise_std, fail_rate
        self.gen = torch.Generator().manual_seed(seed)
        self.__name__ = name

    @torch.no_grad()
    def __call__(self, samples, prompts):
        values = self.score(samples).double().cpu() + self.noise_std * torch.randn(samples.shape[0], generator=self.gen,
                                                                                   dtype=torch.float64)
        if self.fail_rate > 0:
            values[torch.rand(samples.shape[0], generator=self.gen) < self.fail_rate] = float("nan")
        return values.tolist()


# ---------------------------------------------------------------------------------------------- digits
def setup_digits(args, config):
    from hf_control_ft.tasks import digits

    unet, scheduler = digits.load_or_pretrain_digits_model(args.cache_dir, progress=True)
    proxy, genuine = digits.load_or_train_classifiers(args.cache_dir)
    target = args.target_digit

    def genuine_logprob(x):
        return F.log_softmax(genuine(x.float()), dim=-1)[:, target]

    oracle = NoisyOracle(genuine_logprob, args.oracle_noise, args.oracle_fail_rate, seed=config.seed,
                         name=f"noisy_genuine_logprob[{target}]")
    extractor, dim = None, None
    if args.features == "proxy":
        embed = proxy.net[:-1]  # everything but the logits layer: (B, 1, 8, 8) -> (B, hidden), frozen

        def proxy_features(x):
            return embed(x.float())

        extractor, dim = proxy_features, proxy.net[-1].in_features

    def evaluate(trainer, controlled, n=args.num_eval_samples):
        x = trainer.sample(n, torch.Generator().manual_seed(1234), batch_size=256, controlled=controlled)
        return x, digits.digits_metrics(x.cpu(), proxy, genuine, target)

    def save_grid(x, path):
        digits.digits_grid(x[:64]).save(path)

    return dict(model=unet, scheduler=scheduler, oracle=oracle, sample_shape=digits.SAMPLE_SHAPE,
                feature_extractor=extractor, feature_dim=dim, evaluate=evaluate, save_grid=save_grid,
                headline=("genuine_reward", "proxy_reward", "genuine_target_rate", "diversity_pairwise_distance"))


# ---------------------------------------------------------------------------------------------- mixture
def setup_mixture(args, config):
    from diffusers import DDPMScheduler

    from hf_control_ft.tasks.gaussian_mixture import GaussianMixture, distill_mixture_denoiser

    mix = GaussianMixture([0.6, 0.36, 0.04], [[-3.0, 0.0], [3.0, 0.0], [0.0, 5.2]],
                          (MIXTURE_MODE_STD**2 * torch.eye(2)).expand(3, 2, 2).clone())

    def true_reward(x):
        return -(x - MIXTURE_PEAK.to(x)).pow(2).sum(1) / 4.0

    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    denoiser = distill_mixture_denoiser(mix, scheduler, steps=800, batch_size=512, hidden=64, depth=2, progress=True)
    oracle = NoisyOracle(true_reward, args.oracle_noise, args.oracle_fail_rate, seed=config.seed,
                         name="noisy_true_reward")

    def evaluate(trainer, controlled, n=args.num_eval_samples):
        x = trainer.sample(n, torch.Generator().manual_seed(1234), batch_size=1024, controlled=controlled)
        near = torch.cdist(x.double(), mix.means).min(1).values <= 3 * MIXTURE_MODE_STD
        return x, {"true_reward": float(true_reward(x).mean()), "feasible": float(near.double().mean()),
                   "rare_mode_weight": float((mix.assign(x) == 2).double().mean())}

    def save_grid(x, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4)
        ax.plot(*MIXTURE_PEAK.tolist(), "r*", ms=12)
        ax.set_aspect("equal")
        fig.savefig(path, dpi=100)
        plt.close(fig)

    return dict(model=denoiser, scheduler=scheduler, oracle=oracle, sample_shape=(2,), feature_extractor=None,
                feature_dim=None, evaluate=evaluate, save_grid=save_grid,
                headline=("true_reward", "feasible", "rare_mode_weight"))


def main(argv=None):
    config_fields = format_help([SeikoConfig]).split("\n", 2)[2]  # every config field, with its help
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=config_fields,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("digits", "mixture"), default="digits")
    parser.add_argument("--config", default=None, help="YAML file with SeikoConfig fields")
    parser.add_argument("--target_digit", type=int, default=3)
    parser.add_argument("--cache_dir", default=None, help="digits model + classifiers (default ./cache/digits)")
    parser.add_argument("--features", choices=("raw", "proxy"), default="raw", help="reward-head inputs (digits)")
    parser.add_argument("--oracle_noise", type=float, default=None, help="oracle noise std (digits 0.3, mixture 0.5)")
    parser.add_argument("--oracle_fail_rate", type=float, default=0.0)
    parser.add_argument("--num_eval_samples", type=int, default=512)
    parser.add_argument("--push_to_hub", nargs="?", const=True, default=None,
                        help="push the final adapter to --hub_model_id (as the text-to-image scripts; a repo id right "
                             "after the flag also works)")
    parser.add_argument("--hub_model_id", default=None, help="model repo id for --push_to_hub")
    parser.add_argument("--feedback_dataset_id", "--feedback_repo", dest="feedback_repo", default=None,
                        help="dataset repo id for the feedback dataset")
    args, rest = parser.parse_known_args(argv)
    try:
        config = SeikoConfig.from_cli(args.config, rest)
    except ValueError as err:  # unknown key, bad value, unreadable config: one line, exit status 2
        parser.error(str(err))
    if args.oracle_noise is None:
        args.oracle_noise = 0.3 if args.task == "digits" else 0.5
    task = (setup_digits if args.task == "digits" else setup_mixture)(args, config)

    trainer = SeikoTrainer(config=config, model=task["model"], scheduler=task["scheduler"], oracle=task["oracle"],
                           sample_shape=task["sample_shape"], feature_extractor=task["feature_extractor"],
                           feature_dim=task["feature_dim"])
    out = config.output_dir
    if trainer.completed_rounds and trainer.is_main_process:
        print(f"resuming {out} after round {trainer.completed_rounds} ({trainer.num_queries} queries on disk)")
    x, before = task["evaluate"](trainer, controlled=False)
    if trainer.is_main_process:
        task["save_grid"](x, os.path.join(out, "samples_before.png"))

    def on_round(tr, round_index):
        _, m = task["evaluate"](tr, controlled=True, n=min(256, args.num_eval_samples))
        return {f"eval/{k}": v for k, v in m.items() if k in task["headline"]}

    last = trainer.train(callback=on_round)
    x, after = task["evaluate"](trainer, controlled=True)
    trainer.save_pretrained(os.path.join(out, "final"))
    if args.push_to_hub:
        repo = args.hub_model_id or (args.push_to_hub if isinstance(args.push_to_hub, str) else None)
        if repo is None:
            parser.error("--push_to_hub needs --hub_model_id REPO")
        trainer.push_to_hub(repo, feedback_repo_id=args.feedback_repo)
    if not trainer.is_main_process:  # the feedback dataset and the outputs belong to the main process
        return trainer
    task["save_grid"](x, os.path.join(out, "samples_after.png"))
    metrics = {"task": args.task, "pretrained": before, "seiko": after, "optimism": config.optimism,
               "last_round": {k: v for k, v in last.items() if isinstance(v, (int, float))},
               **trainer.feedback.summary()}
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    print(f"\n{'metric':<30}{'pretrained':>12}{'SEIKO':>12}")
    for k in task["headline"]:
        print(f"{k:<30}{before[k]:>12.3f}{after[k]:>12.3f}")
    print(json.dumps(trainer.feedback.summary()))
    print(f"outputs in {os.path.abspath(out)}: feedback/, trainer_state/, final/, metrics.json, samples_*.png, logs/")
    return trainer


if __name__ == "__main__":
    main()
