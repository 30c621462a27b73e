"""The three tasks of ``benchmarks/seiko_feedback.py``: a known true reward, a noisy oracle of it, a feasibility test.

Each task builds the pretrained model once (:meth:`build`) and then, per run, the SEIKO settings that differ
between tasks (:meth:`config_fields`), the oracle of one seed (:meth:`oracle`) and the evaluation of a model's
samples with the *true* reward (:meth:`evaluate`). The oracle never sees anything but the samples.

``mixture``
    A 2-D three-mode Gaussian mixture in which the mode nearest the reward peak is *rare* (weight 0.04); the
    true reward ``r(x) = -||x - p||^2 / 4`` peaks at ``p = (0, 7.5)``, 2.3 units (4.6 mode std) above the rare
    mode, i.e. off the data manifold. Oracle: ``r(x) + N(0, 0.5^2)``. Feasible: within 3 mode standard
    deviations (1.5 units) of some mode mean. The pretrained model is an MLP denoiser distilled from the mixture.

``digits``
    The 8x8 digits model pretrained on scikit-learn's ``load_digits`` (``hf_control_ft.tasks.digits``). True
    reward: the *genuine* classifier's ``log p(3 | x)`` (trained on the half of the digits the proxy classifier
    never saw; the proxy is not used at all). Oracle: true reward ``+ N(0, 0.3^2)``. Feasible: the sample's
    distance to its nearest real digit is at most the 99th percentile of the same distance for the pretrained
    model's own samples (so 99% of pretrained samples are feasible by construction; a fine-tuned model that
    leaves the image manifold for an adversarial pattern of the classifier is not). Reward heads see raw pixels.

``rare``
    The regime SEIKO is for: the only high reward sits on a mode the pretrained model rarely draws, and nothing
    points there from where its mass is. Same geometry as ``mixture`` but the top mode has weight 0.03; the true
    reward is a bump on it, ``r(x) = 4 exp(-||x - m||^2 / (2 * 0.75^2))`` with ``m = (0, 5.2)`` its mean, zero to
    machine precision (about ``4 e^-32``) and flat on the common modes 6 units away, so a reward model fitted
    where the pretrained model puts its mass has no slope to follow. Oracle: ``r(x) + N(0, 0.5^2)``; 4 rounds of
    32 queries (128 in all). Feasible: as ``mixture``. The high-reward region is ``r(x) >= 2`` (within 0.88 of
    ``m``); a run *found* it when its final model puts at least twice the pretrained model's mass there.
    When fixed: every constant (bump height and width, noise, budgets, the training settings copied from
    ``mixture``, the definition of *found*) was fixed on 2026-12-05 before any run of UCB or greedy on this task,
    with a top-mode weight of 0.01. That first run (evaluation seeds, the old bonus) showed the 10-step sampler
    of the distilled model putting only 0.4 % of its samples on that mode (0.15 % in the region: 0.2 expected
    hits in 128 queries) and every method at the pretrained reward; the weight was then raised to 0.03 (the
    pretrained model draws 1.5 % there, 1.0 % in the region: 1.3 expected hits), nothing else changed. The
    bonus's cap was chosen after that on the tuning seeds 100-102 (``benchmarks/seiko_feedback.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIXTURE_STD = 0.5
MIXTURE_PEAK = (0.0, 7.5)


class NoisyOracle:
    """``score(x) + N(0, noise_std^2)`` with its own seeded noise stream; returns plain floats (no gradient)."""

    def __init__(self, score, noise_std: float, seed: int, name: str):
        self.score, self.noise_std = score, noise_std
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.__name__ = name

    @torch.no_grad()
    def __call__(self, samples, prompts):
        noise = self.noise_std * torch.randn(samples.shape[0], generator=self.gen, dtype=torch.float64)
        return (self.score(samples).double().cpu() + noise).tolist()


def mixture_of(weights):
    """The 2-D three-mode mixture of ``mixture`` and ``rare`` with the given mode weights (common, common, top)."""
    from hf_control_ft.tasks.gaussian_mixture import GaussianMixture

    return GaussianMixture(list(weights), [[-3.0, 0.0], [3.0, 0.0], [0.0, 5.2]],
                           (MIXTURE_STD**2 * torch.eye(2)).expand(3, 2, 2).clone())


class MixtureTask:
    name = "mixture"
    sample_shape = (2,)
    noise_std = 0.5
    weights = (0.6, 0.36, 0.04)

    def __init__(self, quick: bool = False):
        self.quick = quick

    def build(self):
        from diffusers import DDPMScheduler

        from hf_control_ft.tasks.gaussian_mixture import distill_mixture_denoiser

        self.mixture = mixture_of(self.weights)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
        self.model = distill_mixture_denoiser(self.mixture, self.scheduler, steps=800, batch_size=512, hidden=64,
                                              depth=2, seed=0, progress=False)

    def true_reward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x - torch.tensor(MIXTURE_PEAK).to(x)).pow(2).sum(1) / 4.0

    def oracle(self, seed: int) -> NoisyOracle:
        return NoisyOracle(self.true_reward, self.noise_std, seed, "noisy_true_reward")

    def evaluate(self, x: torch.Tensor) -> dict:
        near = torch.cdist(x.double(), self.mixture.means).min(1).values <= 3 * MIXTURE_STD
        return {"true_reward": float(self.true_reward(x).mean()), "feasible": float(near.double().mean()),
                "rare_mode_weight": float((self.mixture.assign(x) == 2).double().mean())}

    def budgets(self) -> list[int]:
        return [16, 32, 64] if self.quick else [32, 64, 128, 256]

    def config_fields(self) -> dict:
        return dict(num_inference_steps=10, train_steps=15 if self.quick else 30, batch_size=64, learning_rate=3e-3,
                    lora_rank=8, value_num_rollouts=256 if self.quick else 512, reward_hidden=32,
                    reward_train_steps=200, eval_n=512 if self.quick else 2048)


class DigitsTask:
    name = "digits"
    sample_shape = (1, 8, 8)
    noise_std = 0.3
    target = 3

    def __init__(self, quick: bool = False, cache_dir: str | None = None):
        self.quick, self.cache_dir = quick, cache_dir

    def build(self):
        from hf_control_ft.tasks import digits

        self.model, self.scheduler = digits.load_or_pretrain_digits_model(self.cache_dir, progress=False)
        _, self.genuine = digits.load_or_train_classifiers(self.cache_dir)
        self.genuine.eval().requires_grad_(False)
        self.real, _ = digits.load_digits_tensors()
        self.feasible_radius = None  # set by calibrate() from the pretrained model's samples

    def true_reward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.genuine(x.float()), dim=-1)[:, self.target]

    def oracle(self, seed: int) -> NoisyOracle:
        return NoisyOracle(self.true_reward, self.noise_std, seed, f"noisy_genuine_logprob[{self.target}]")

    def nearest_real_distance(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.flatten(1).double(), self.real.flatten(1).double()).min(1).values

    def calibrate(self, pretrained_samples: torch.Tensor) -> None:
        """Feasible radius: 99th percentile of the pretrained samples' distance to the nearest real digit."""
        self.feasible_radius = float(torch.quantile(self.nearest_real_distance(pretrained_samples), 0.99))

    def evaluate(self, x: torch.Tensor) -> dict:
        with torch.no_grad():
            r = self.true_reward(x)
            pred = self.genuine(x.float()).argmax(-1)
        return {"true_reward": float(r.mean()),
                "feasible": float((self.nearest_real_distance(x) <= self.feasible_radius).double().mean()),
                "target_rate": float((pred == self.target).double().mean())}

    def budgets(self) -> list[int]:
        return [16, 32, 64] if self.quick else [32, 64, 128, 256]

    def config_fields(self) -> dict:
        return dict(num_inference_steps=10, train_steps=5 if self.quick else 15, batch_size=16, learning_rate=3e-3,
                    lora_rank=4, lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                    value_num_rollouts=128 if self.quick else 256, reward_hidden=64, reward_train_steps=300,
                    eval_n=256 if self.quick else 512)


class RareTask(MixtureTask):
    """``rare`` (module docstring): a flat reward except for a bump on a 3 % mode."""

    name = "rare"
    weights = (0.6, 0.37, 0.03)
    bump_height, bump_width = 4.0, 0.75

    def true_reward(self, x: torch.Tensor) -> torch.Tensor:
        d2 = (x - self.mixture.means[2].to(x)).pow(2).sum(1)
        return self.bump_height * torch.exp(-d2 / (2 * self.bump_width**2))

    def in_region(self, x: torch.Tensor) -> torch.Tensor:
        """The high-reward region ``r(x) >= bump_height / 2``, ``(B,)`` bool."""
        return self.true_reward(x) >= self.bump_height / 2

    def evaluate(self, x: torch.Tensor) -> dict:
        return {**super().evaluate(x), "region_fraction": float(self.in_region(x).double().mean())}

    def region_center(self) -> torch.Tensor:
        """The bump's centre (the rare mode's mean), ``(1, 2)``."""
        return self.mixture.means[2:3].float()

    def queries_in_region(self, queried: torch.Tensor) -> int:
        """How many of the oracle's queries so far landed in the high-reward region."""
        return int(self.in_region(queried.reshape(-1, 2)).sum())

    def budgets(self) -> list[int]:
        return [16, 16, 16] if self.quick else [32, 32, 32, 32]


TASKS = {"mixture": MixtureTask, "digits": DigitsTask, "rare": RareTask}
