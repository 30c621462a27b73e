"""The embedded default task: 8x8 handwritten digits from scikit-learn (ships with the package, no download).

* a small diffusers ``UNet2DModel`` (8x8, 1 channel) pretrained with a ``DDPMScheduler`` on all 1,797 digits and
  saved as a stock ``DDPMPipeline`` (``DDPMPipeline.from_pretrained(cache_dir / "pipeline")`` loads it);
* two digit classifiers trained on **disjoint halves** of the data: the *proxy* (an MLP, the differentiable
  reward the trainer sees) and the *genuine* one (a small CNN trained with noise augmentation, kept for
  evaluation). Optimising the proxy too hard finds images it likes that the genuine classifier does not:
  the imperfect-reward setting of the ELEGANT / SEIKO papers;
* metrics: proxy and genuine reward, diversity (mean pairwise distance, class entropy, distinct classes) and
  the genuine classifier's per-class histogram.

Pixels are in ``[-1, 1]`` (``0..16`` grey levels mapped linearly), shape ``(B, 1, 8, 8)``. Everything is cached
under ``cache_dir`` (default ``$HF_CONTROL_FT_CACHE`` or ``./cache/digits``) and reused when present.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from tqdm.auto import tqdm

from ..utils.images import image_grid

NUM_CLASSES = 10
SAMPLE_SHAPE = (1, 8, 8)
PIPELINE_DIR = "pipeline"
PROXY_DIR = "proxy_classifier"
GENUINE_DIR = "genuine_classifier"


def default_cache_dir() -> str:
    return os.environ.get("HF_CONTROL_FT_CACHE", os.path.join("cache", "digits"))


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(N, 1, 8, 8)`` float32 in ``[-1, 1]`` and their labels ``(N,)`` int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(data.target, dtype=torch.long)


def disjoint_halves(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Index sets of two disjoint halves of ``range(n)`` (proxy half, genuine half)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2], perm[n // 2:]


# ---------------------------------------------------------------------------------------------- UNet
def digits_unet_config() -> dict:
    """A 0.18M-parameter UNet for 8x8 inputs, with attention (to_q/to_k/to_v/to_out.0) at 4x4.

    Small on purpose: ELEGANT runs it ~5 times per sampling step per iteration, on 2 CPU cores."""
    return dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=8, attention_head_dim=8)


def digits_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)


def pretrain_digits_unet(steps: int = 3000, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0,
                         progress: bool = True):
    """Trains the UNet on all digits with the standard noise-prediction loss; returns ``(unet, scheduler)``."""
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler

    torch.manual_seed(seed)
    images, _ = load_digits_tensors()
    unet = UNet2DModel(**digits_unet_config())
    scheduler = digits_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    lr_schedule = get_scheduler("cosine", opt, num_warmup_steps=min(200, steps // 10), num_training_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    bar = tqdm(range(steps), desc="pretraining digits UNet", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return unet, scheduler


def load_or_pretrain_digits_model(cache_dir: str | None = None, steps: int = 3000, progress: bool = True):
    """The pretrained digits model ``(unet, scheduler)``: loaded from ``cache_dir/pipeline`` or trained and saved
    there as a stock ``DDPMPipeline``. ``steps`` only matters when training."""
    from diffusers import DDPMPipeline

    path = os.path.join(cache_dir or default_cache_dir(), PIPELINE_DIR)
    if not os.path.exists(os.path.join(path, "model_index.json")):
        unet, scheduler = pretrain_digits_unet(steps=steps, progress=progress)
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    pipe = DDPMPipeline.from_pretrained(path)
    pipe.unet.eval().requires_grad_(False)
    return pipe.unet, pipe.scheduler


def digits_grid(samples: torch.Tensor, nrow: int = 8):
    """A PIL grid of digits in ``[-1, 1]``, 4x enlarged."""
    return image_grid(samples, nrow=nrow, scale=4)


def digits_pipeline_path(cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), PIPELINE_DIR)


# ---------------------------------------------------------------------------------------------- classifiers
class DigitClassifier(nn.Module, PyTorchModelHubMixin):
    """Logits ``(B, 10)`` of an 8x8 digit in ``[-1, 1]``; ``kind="mlp"`` (proxy) or ``"cnn"`` (genuine)."""

    def __init__(self, kind: str = "mlp", hidden: int = 128):
        super().__init__()
        if kind not in ("mlp", "cnn"):
            raise ValueError(f"DigitClassifier.kind must be 'mlp' or 'cnn', got {kind!r}")
        self.kind = kind
        if kind == "mlp":
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                     nn.SiLU(), nn.Linear(hidden, NUM_CLASSES))
        else:
            self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1),
                                     nn.SiLU(), nn.AvgPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
                                     nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64 * 4, hidden), nn.SiLU(),
                                     nn.Linear(hidden, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(kind: str, images: torch.Tensor, labels: torch.Tensor, epochs: int = 60,
                     noise_std: float = 0.0, seed: int = 0) -> DigitClassifier:
    """Cross-entropy training with Adam; ``noise_std`` > 0 adds Gaussian input noise (robustness)."""
    torch.manual_seed(seed)
    model = DigitClassifier(kind)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, 64):
            idx = perm[start:start + 64]
            x = images[idx]
            if noise_std > 0:
                x = x + noise_std * torch.randn(x.shape, generator=gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(images).argmax(-1) == labels).float().mean())


def load_or_train_classifiers(cache_dir: str | None = None, epochs: int = 60) -> tuple[DigitClassifier, DigitClassifier]:
    """``(proxy, genuine)`` classifiers, trained on disjoint halves and cached (safetensors + config)."""
    root = cache_dir or default_cache_dir()
    paths = os.path.join(root, PROXY_DIR), os.path.join(root, GENUINE_DIR)
    if not all(os.path.exists(os.path.join(p, "model.safetensors")) for p in paths):
        images, labels = load_digits_tensors()
        half_a, half_b = disjoint_halves(images.shape[0])
        proxy = train_classifier("mlp", images[half_a], labels[half_a], epochs=epochs, seed=1)
        genuine = train_classifier("cnn", images[half_b], labels[half_b], epochs=epochs, noise_std=0.3, seed=2)
        report = {"proxy_heldout_accuracy": accuracy(proxy, images[half_b], labels[half_b]),
                  "genuine_heldout_accuracy": accuracy(genuine, images[half_a], labels[half_a])}
        for model, path in zip((proxy, genuine), paths):
            model.save_pretrained(path)
        with open(os.path.join(root, "classifiers.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    proxy, genuine = (DigitClassifier.from_pretrained(p).eval().requires_grad_(False) for p in paths)
    return proxy, genuine


# ---------------------------------------------------------------------------------------------- rewards
class DigitReward(nn.Module):
    """Reward ``log p(target | x)`` under a digit classifier: ``(B, 1, 8, 8) -> (B,)``, differentiable, in nats."""

    def __init__(self, classifier: nn.Module, target_digit: int, name: str = "digit_logprob"):
        super().__init__()
        if not 0 <= int(target_digit) < NUM_CLASSES:
            raise ValueError(f"target_digit must be in 0..9, got {target_digit!r}")
        self.classifier = classifier
        self.target_digit = int(target_digit)
        self.__name__ = f"{name}[{target_digit}]"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.classifier(x.float()), dim=-1)[:, self.target_digit]


# ---------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance between distinct samples (flattened), a diversity measure in pixel units."""
    flat = x.reshape(x.shape[0], -1).double()
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


@torch.no_grad()
def digits_metrics(samples: torch.Tensor, proxy: nn.Module, genuine: nn.Module, target_digit: int) -> dict:
    """Proxy / genuine reward, accuracy toward the target, diversity and the genuine per-class histogram."""
    x = samples.float()
    proxy_logp = F.log_softmax(proxy(x), -1)
    genuine_logp = F.log_softmax(genuine(x), -1)
    pred = genuine_logp.argmax(-1)
    hist = torch.bincount(pred, minlength=NUM_CLASSES).double() / x.shape[0]
    nz = hist[hist > 0]
    in_target = x[pred == target_digit]
    return {
        "num_samples": int(x.shape[0]),
        "proxy_reward": float(proxy_logp[:, target_digit].mean()),
        "genuine_reward": float(genuine_logp[:, target_digit].mean()),
        "proxy_target_rate": float((proxy_logp.argmax(-1) == target_digit).double().mean()),
        "genuine_target_rate": float((pred == target_digit).double().mean()),
        "diversity_pairwise_distance": mean_pairwise_distance(x),
        # style diversity within the target class (a collapsed model draws the same few images)
        "target_class_pairwise_distance": mean_pairwise_distance(in_target) if len(in_target) > 1 else None,
        "class_entropy_nats": float(-(nz * nz.log()).sum()),
        "distinct_classes": int((hist >= 0.01).sum()),
        "genuine_class_histogram": [round(float(h), 4) for h in hist],
        "pixel_range": [float(x.min()), float(x.max())],
    }
