"""Train ELEGANT on the 2-D Gaussian mixture with a linear reward and check it against the exact target.

    accelerate launch examples/train_mixture.py --config examples/configs/mixture_elegant.yaml \\
        --output_dir outputs/mixture-elegant [--alpha 1.0 --eta 0.3 ...]

Any ``--key value`` after the known arguments overrides a field of ``ElegantConfig``; unknown keys are errors.
Writes the adapter, initial-noise model, config and ``metrics.json`` to the output directory (main process
only) and refuses to overwrite an existing one unless ``--overwrite`` is given.
"""

import argparse
import json
import os

import torch
from diffusers import DDIMScheduler

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.tasks.gaussian_mixture import distill_mixture_denoiser, three_mode_mixture
from hf_control_ft.utils.config_cli import format_help


def main():
    config_fields = format_help([ElegantConfig]).split("\n", 2)[2]  # every config field, with its help
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=config_fields,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with ElegantConfig fields")
    parser.add_argument("--output_dir", default="outputs/mixture-elegant")
    parser.add_argument("--overwrite_output_dir", "--overwrite", dest="overwrite", action="store_true")
    args, rest = parser.parse_known_args()
    try:
        config = ElegantConfig.from_cli(args.config, rest)
    except ValueError as err:  # unknown key, bad value, unreadable config: one line, exit status 2
        parser.error(str(err))
    if config.logging_dir is None:
        config.logging_dir = os.path.join(args.output_dir, "logs")
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        raise SystemExit(f"{args.output_dir} exists and is not empty; pass --overwrite or choose another directory")

    mixture = three_mode_mixture()
    c = torch.tensor([0.5, 0.3])
    target = mixture.tilted_linear(c, config.alpha)
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    denoiser = distill_mixture_denoiser(mixture, scheduler, progress=True)

    def linear_reward(x):
        return x @ c.to(x)

    trainer = ElegantTrainer(config, denoiser, scheduler, linear_reward, sample_shape=(2,))
    summary = trainer.train()
    samples = trainer.sample(8192, torch.Generator().manual_seed(0), batch_size=2048)
    pre = trainer.sample(8192, torch.Generator().manual_seed(0), batch_size=2048, controlled=False)
    metrics = {**summary, "tv_to_target": target.mode_weight_tv(samples),
               "tv_to_target_pretrained": target.mode_weight_tv(pre),
               "target_weights": target.weights.tolist()}
    trainer.save_pretrained(args.output_dir)
    if trainer.is_main_process:
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps({k: metrics[k] for k in ("tv_to_target_pretrained", "tv_to_target", "train/reward",
                                                  "train/kl")}))
        print(f"outputs written to {args.output_dir}")


if __name__ == "__main__":
    main()
