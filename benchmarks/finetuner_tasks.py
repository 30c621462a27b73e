"""The tasks of ``benchmarks/compare_finetuners.py``: what is fine-tuned, toward which reward, and how a batch of
samples is scored. Every method of the comparison gets the same model, scheduler, LoRA targets and reward from
one of these.

* :class:`MixtureComparison` -- the exact 2-D mixture of ``benchmarks/tilted_cases.py`` with its linear reward
  (alpha 2), as a DDIM chain (``linear_2d``) or a rectified flow (``flow_linear_2d``). Scores: reward, path KL and
  the mode-weight TV to the known tilted target.
* :class:`DigitsComparison` -- the embedded digits task (``hf_control_ft/tasks/digits.py``): the pretrained
  8x8 UNet, the *proxy* classifier's ``log p(3 | x)`` as the reward every method trains on, the *genuine*
  classifier (trained on the other half of the data) for evaluation; ELEGANT's settings are the shipped
  ``examples/configs/digits_elegant.yaml``. Scores: proxy and genuine reward, genuine 3-rate, diversity (mean
  pairwise L2), within-class diversity (the same among samples the genuine classifier calls a 3) and path KL.
"""

from __future__ import annotations

import copy
import math
import os

import torch

from hf_control_ft import ElegantConfig
from hf_control_ft.core.control import add_lora_control

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_STAGES = {"value_num_rollouts": 256, "value_train_steps": 30, "step_value_train_steps": 30,
                "noise_train_steps": 10}


def _finite_or_none(value):
    return round(float(value), 4) if value is not None and math.isfinite(value) else None


class MixtureComparison:
    """The exact mixture (``sampler="ddim"``: DDIM at eta 1; ``"flow"``: exact flow transitions at the eta of Flow-GRPO's ``a = 0.7``)."""

    primary = "reward"  # the reward the comparison's goal is stated in
    metrics = ("reward", "kl", "tv")

    def __init__(self, sampler: str = "ddim", quick: bool = False):
        from hf_control_ft.core.flow_matching import memoryless_eta

        self.sampler, self.quick = sampler, quick
        self.eta = 1.0 if sampler == "ddim" else memoryless_eta(0.7)
        self.steps, self.batch_size, self.lr = (10 if quick else 50), 128, 1e-3
        self.target_modules = None  # the library's default targets for the MLP denoiser

    def build(self) -> "MixtureComparison":
        from tilted_cases import build_case

        self.case = build_case("linear_2d" if self.sampler == "ddim" else "flow_linear_2d",
                               distill_steps=300 if self.quick else 1500)
        self.reward, self.alpha, self.scheduler = self.case["reward"], self.case["alpha"], self.case["scheduler"]
        self.shape = (self.case["mixture"].dim,)
        return self

    def describe(self) -> dict:
        return {"task": "mixture", "sampler": self.sampler, "eta": self.eta, "alpha": self.alpha,
                "steps": self.steps, "target_weights": [round(float(w), 4) for w in self.case["target"].weights]}

    def new_model(self) -> torch.nn.Module:
        from tilted_cases import load_denoiser

        return load_denoiser(self.case["denoiser_state"])

    def add_lora(self, model: torch.nn.Module) -> None:
        add_lora_control(model, rank=8, target_modules=self.target_modules)

    def elegant_config(self, args, seed: int) -> ElegantConfig:
        return ElegantConfig(alpha=self.alpha, eta=self.eta, num_inference_steps=self.steps,
                             train_steps=args.train_steps or 400, batch_size=self.batch_size, learning_rate=self.lr,
                             lora_rank=8, seed=seed, report_to=None, **(QUICK_STAGES if self.quick else {}))

    def evaluate(self, samples: torch.Tensor, kl: float) -> dict:
        reward = float(self.reward(samples).mean())
        finite = math.isfinite(reward) and math.isfinite(kl)  # a diverged run (NaN / inf samples) is recorded
        return {"reward": _finite_or_none(reward) if finite else None, "kl": _finite_or_none(kl) if finite else None,
                "tv": round(self.case["target"].mode_weight_tv(samples), 4), "diverged": not finite}


class DigitsComparison:
    """The digits task; every method trains on the proxy reward, the genuine classifier judges."""

    primary = "genuine_reward"
    metrics = ("reward", "genuine_reward", "genuine_target_rate", "diversity", "within_class_diversity", "kl")
    target_digit = 3

    def __init__(self, quick: bool = False, cache_dir: str | None = None,
                 config: str = os.path.join(ROOT, "examples", "configs", "digits_elegant.yaml")):
        self.quick, self.cache_dir, self.config_path = quick, cache_dir, config
        base = ElegantConfig.from_yaml(config, output_dir=None, report_to=None, checkpointing_steps=0)
        self.base_config = base
        self.alpha, self.eta, self.steps = base.alpha, base.eta, base.num_inference_steps
        self.batch_size, self.lr, self.target_modules = base.batch_size, base.learning_rate, base.lora_target_modules

    def build(self) -> "DigitsComparison":
        from hf_control_ft.tasks import digits

        self.digits = digits
        self.unet, self.scheduler = digits.load_or_pretrain_digits_model(self.cache_dir, progress=False)
        self.proxy, self.genuine = digits.load_or_train_classifiers(self.cache_dir)
        self.reward = digits.DigitReward(self.proxy, self.target_digit, name="proxy_digit_logprob")
        self.shape = digits.SAMPLE_SHAPE
        images, labels = digits.load_digits_tensors()
        self.data_within_class = digits.mean_pairwise_distance(images[labels == self.target_digit])
        return self

    def describe(self) -> dict:
        return {"task": "digits", "sampler": "ddpm", "eta": self.eta, "alpha": self.alpha, "steps": self.steps,
                "target_digit": self.target_digit, "elegant_config": os.path.relpath(self.config_path, ROOT),
                "data_within_class_diversity": round(self.data_within_class, 4)}

    def new_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.unet)

    def add_lora(self, model: torch.nn.Module) -> None:
        add_lora_control(model, rank=self.base_config.lora_rank, target_modules=self.target_modules)

    def elegant_config(self, args, seed: int) -> ElegantConfig:
        fields = {**self.base_config.to_dict(), "seed": seed, "num_inference_steps": self.steps,
                  "batch_size": self.batch_size, "learning_rate": self.lr}
        if args.train_steps:
            fields["train_steps"] = args.train_steps
        if self.quick:
            fields.update(value_num_rollouts=64, value_train_steps=20, noise_train_steps=10)
        return ElegantConfig.from_dict(fields)

    def evaluate(self, samples: torch.Tensor, kl: float) -> dict:
        x = samples.float()
        if not bool(torch.isfinite(x).all()) or not math.isfinite(kl):
            return {"reward": None, "genuine_reward": None, "kl": None, "diverged": True}
        m = self.digits.digits_metrics(x, self.proxy, self.genuine, self.target_digit)
        return {"reward": _finite_or_none(m["proxy_reward"]), "genuine_reward": _finite_or_none(m["genuine_reward"]),
                "genuine_target_rate": round(m["genuine_target_rate"], 4),
                "diversity": round(m["diversity_pairwise_distance"], 4),
                "within_class_diversity": _finite_or_none(m["target_class_pairwise_distance"]),
                "kl": _finite_or_none(kl), "diverged": False}


def build_task(name: str, sampler: str = "ddim", quick: bool = False, cache_dir: str | None = None):
    """``"mixture"`` (with ``sampler``) or ``"digits"``, built."""
    if name == "digits":
        return DigitsComparison(quick=quick, cache_dir=cache_dir).build()
    return MixtureComparison(sampler=sampler, quick=quick).build()
