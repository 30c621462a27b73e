"""The two tasks of ``benchmarks/seiko_feedback.py``: a known true reward, a noisy oracle of it, a feasibility test.

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


class MixtureTask:
    name = "mixture"
    sample_shape = (2,)
    noise_std = 0.5

    def __init__(self, quick: bool = False):
        self.quick = quick

    def build(self):
        from diffusers import DDPMScheduler

        from hf_control_ft.tasks.gaussian_mixture import GaussianMixture, distill_mixture_denoiser

        self.mixture = GaussianMixture([0.6, 0.36, 0.04], [[-3.0, 0.0], [3.0, 0.0], [0.0, 5.2]],
                                       (MIXTURE_STD**2 * torch.eye(2)).expand(3, 2, 2).clone())
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


TASKS = {"mixture": MixtureTask, "digits": DigitsTask}
