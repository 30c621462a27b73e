"""Reward model with uncertainty for SEIKO: an ensemble of heads on a feature extractor (``docs/algorithms.md`` §6).

Each head is a small MLP ``x -> features(x) -> phi_h(x) (penultimate, width hidden) -> r_h(x)`` regressing the
oracle values of the feedback dataset (inputs and targets standardised from the data). ``features`` is the
raw flattened sample by default (small samples) or any differentiable embedding (images: a frozen CLIP/ResNet
wrapper; pass ``feature_extractor`` and its output width ``feature_dim``).

Optimistic rewards (:class:`OptimisticReward`), all differentiable in ``x`` (the trainer backpropagates
through them):

* ``"greedy"``: ``mean_h r_h(x)`` (no bonus);
* ``"ucb"``: ``mean_h r_h(x) + C * tau * mean_h sqrt(phi_h(x)^T A_h^{-1} phi_h(x))`` with the Gram matrix
  ``A_h = lambda I + sum_{x_i in D} phi_h(x_i) phi_h(x_i)^T`` over the dataset -- *not* a centred covariance,
  so with a fixed feature map adding data can only shrink the bonus (``A`` grows in the PSD order);
* ``"bootstrap"``: heads trained on bootstrap resamples of ``D``; ``mean_h r_h + C * std_h r_h``;
* ``"ts"`` (Thompson sampling): heads on bootstrap resamples; one head ``r_h`` drawn per round.

**Units.** ``tau`` is the round's temperature ``alpha + beta`` (reward units per nat): the update multiplies
the density at ``x`` by ``exp(g(x) / tau)``, so ``g / tau`` is the bonus in nats of tilt. The UCB width is
dimensionless (about ``1 / sqrt(n)`` where ``n`` queries are dense, order 1 and above where there are none), so
``C * tau * width`` makes an unexplored region worth about ``C`` nats whatever the oracle's noise and however flat
the values observed so far. (Scaling the width by the observed values' spread, as this module once did, made
the bonus as small as the oracle's noise in the regime where nothing good has been found yet -- exactly when
exploration is needed; ``docs/algorithms.md`` section 6.) The bootstrap spread is already in reward units.

**Bounded optimism.** Both bonuses grow without bound off the data (the UCB width is linear in ``|phi|``; the
heads' spread grows with the distance from the data), and the drift would chase them off the feasible
manifold. Two guards, both documented config fields of SEIKO:

* the bonus is saturated smoothly at ``bonus_cap`` nats: ``g = m tanh(g_raw / m)`` with ``m = bonus_cap * tau``
  (equal to ``g_raw`` to first order where ``g_raw`` is small against ``m``, never above ``m``, and with a
  vanishing gradient far off the data, so there is nothing to chase there); one round's update then multiplies
  no density by more than ``exp(bonus_cap)`` for the bonus's sake, and the KL to the pretrained model keeps a
  region it never draws (off the feasible manifold) negligible;
* feature standard deviations are floored at ``feature_std_floor`` times their mean over features, so a nearly
  constant feature (an image border) cannot turn a tiny shift into a huge standardised feature.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMISM_KINDS = ("ucb", "bootstrap", "ts", "greedy")


class _Head(nn.Module):
    def __init__(self, in_dim: int, hidden: int, depth: int):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, 1)

    def forward(self, f: torch.Tensor):
        phi = self.body(f)
        return self.out(phi).squeeze(-1), phi


class RewardEnsemble(nn.Module):
    """``ensemble_size`` regression heads on a shared (fixed) feature extractor.

    Args:
        sample_shape: shape of one sample.
        ensemble_size: number of heads ``H``.
        hidden, depth: width of ``phi`` and number of hidden layers per head.
        feature_extractor: differentiable ``(B, *sample_shape) -> (B, feature_dim)``; default flattens.
        feature_dim: output width of ``feature_extractor`` (required with one).
        feature_std_floor: feature standard deviations are floored at this fraction of their mean (module
            docstring); 0 keeps only a 1e-6 floor.
    """

    def __init__(self, sample_shape, ensemble_size: int = 4, hidden: int = 64, depth: int = 2,
                 feature_extractor=None, feature_dim: int | None = None, feature_std_floor: float = 0.1):
        super().__init__()
        if not feature_std_floor >= 0:
            raise ValueError(f"feature_std_floor must be >= 0, got {feature_std_floor!r}")
        self.feature_std_floor = float(feature_std_floor)
        self.sample_shape = tuple(int(d) for d in sample_shape)
        if feature_extractor is not None and feature_dim is None:
            raise ValueError("feature_dim is required with a feature_extractor")
        self.feature_extractor = feature_extractor
        dim = feature_dim if feature_extractor is not None else math.prod(self.sample_shape)
        self.heads = nn.ModuleList(_Head(dim, hidden, depth) for _ in range(ensemble_size))
        self.register_buffer("f_mean", torch.zeros(dim))
        self.register_buffer("f_std", torch.ones(dim))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))
        self.register_buffer("gram_inv", torch.zeros(ensemble_size, hidden, hidden))
        self.has_gram = False

    @property
    def ensemble_size(self) -> int:
        return len(self.heads)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised features ``(B, feature_dim)``."""
        f = x.reshape(x.shape[0], -1) if self.feature_extractor is None else self.feature_extractor(x)
        return (f - self.f_mean) / self.f_std

    def head_outputs(self, x: torch.Tensor):
        """``(preds, phis)``: predictions ``(H, B)`` in reward units and penultimate features ``(H, B, hidden)``."""
        f = self.features(x)
        preds, phis = zip(*(head(f) for head in self.heads))
        return torch.stack(preds) * self.y_std + self.y_mean, torch.stack(phis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble mean ``(B,)``."""
        return self.head_outputs(x)[0].mean(0)

    # ------------------------------------------------------------------ fitting
    def fit(self, x: torch.Tensor, y: torch.Tensor, bootstrap: bool, steps: int = 500, lr: float = 3e-3,
            weight_decay: float = 1e-4, batch_size: int = 256, generator: torch.Generator | None = None) -> float:
        """Fits every head by MSE on ``(x, y)`` (``bootstrap``: head ``h`` on its own resample with replacement).

        Heads are re-initialised from ``generator`` so a refit is a deterministic function of the data.
        Returns the final mean training loss (standardised units).
        """
        if x.shape[0] < 2:
            raise ValueError(f"the reward ensemble needs at least 2 answered queries, got {x.shape[0]}")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        device = self.f_mean.device
        x, y = x.to(device), y.to(device).float()
        with torch.no_grad():
            f = x.reshape(x.shape[0], -1) if self.feature_extractor is None else self.feature_extractor(x)
            self.f_mean.copy_(f.mean(0))
            std = f.std(0)
            self.f_std.copy_(std.clamp_min(max(self.feature_std_floor * float(std.mean()), 1e-6)))
            self.y_mean.copy_(y.mean())
            self.y_std.copy_(y.std().clamp_min(1e-6))
            f = (f - self.f_mean) / self.f_std
        z = (y - self.y_mean) / self.y_std
        n = x.shape[0]
        last = 0.0
        for head in self.heads:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            with torch.random.fork_rng(devices=[]):  # re-initialise without touching the global stream
                torch.manual_seed(seed)
                for m in head.modules():
                    if isinstance(m, nn.Linear):
                        m.reset_parameters()
            head.requires_grad_(True)
            idx_pool = torch.randint(0, n, (n,), generator=gen) if bootstrap else torch.arange(n)
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
            for _ in range(steps):
                b = idx_pool[torch.randint(0, n, (min(batch_size, n),), generator=gen)].to(device)
                pred, _ = head(f[b])
                loss = (pred - z[b]).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            head.requires_grad_(False)
            last += loss.item() / self.ensemble_size
        self.has_gram = False
        return last

    @torch.no_grad()
    def fit_gram(self, x: torch.Tensor, ridge: float = 1.0) -> None:
        """``A_h^{-1}`` with ``A_h = ridge * I + sum_i phi_h(x_i) phi_h(x_i)^T`` over the dataset ``x``."""
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        _, phis = self.head_outputs(x.to(self.f_mean.device))  # (H, N, d)
        eye = torch.eye(phis.shape[-1], dtype=torch.float64, device=phis.device)
        gram = ridge * eye + torch.einsum("hni,hnj->hij", phis.double(), phis.double())
        self.gram_inv.copy_(torch.linalg.inv(gram).to(self.gram_inv.dtype))
        self.has_gram = True

    def ucb_width(self, x: torch.Tensor, phis: torch.Tensor | None = None) -> torch.Tensor:
        """``mean_h sqrt(phi_h(x)^T A_h^{-1} phi_h(x))``, ``(B,)``, differentiable in ``x``."""
        if not self.has_gram:
            raise RuntimeError("call fit_gram(dataset_samples) before using the UCB bonus")
        if phis is None:
            phis = self.head_outputs(x)[1]
        quad = torch.einsum("hbi,hij,hbj->hb", phis, self.gram_inv, phis)
        return quad.clamp_min(1e-12).sqrt().mean(0)


class OptimisticReward:
    """``x -> r_hat(x) + g(x)`` for one round; differentiable in ``x`` (see the module docstring).

    Args:
        ensemble: a fitted :class:`RewardEnsemble` (with ``fit_gram`` done for ``"ucb"``).
        kind: one of ``"ucb"``, ``"bootstrap"``, ``"ts"``, ``"greedy"``.
        bonus_scale: ``C``.
        head: the head drawn for ``"ts"``.
        bonus_cap: the bonus saturates at ``bonus_cap`` nats, ``bonus_cap * temperature`` reward units (module
            docstring); ``None``: unbounded.
        temperature: ``tau = alpha + beta`` of the round's update, reward units per nat (> 0).
    """

    def __init__(self, ensemble: RewardEnsemble, kind: str, bonus_scale: float = 1.0, head: int | None = None,
                 bonus_cap: float | None = 3.0, temperature: float = 1.0):
        if bonus_cap is not None and not bonus_cap > 0:
            raise ValueError(f"bonus_cap must be > 0 or None, got {bonus_cap!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.bonus_cap = None if bonus_cap is None else float(bonus_cap)
        self.temperature = float(temperature)
        if kind not in OPTIMISM_KINDS:
            raise ValueError(f"kind must be one of {OPTIMISM_KINDS}, got {kind!r}")
        if kind == "ts" and (head is None or not 0 <= head < ensemble.ensemble_size):
            raise ValueError(f"'ts' needs a head index in [0, {ensemble.ensemble_size}), got {head!r}")
        if kind == "bootstrap" and ensemble.ensemble_size < 2:
            raise ValueError("'bootstrap' needs ensemble_size >= 2 (the bonus is the heads' spread)")
        self.ensemble, self.kind, self.bonus_scale, self.head = ensemble, kind, float(bonus_scale), head
        self.__name__ = f"optimistic_reward_{kind}"

    def parts(self, x: torch.Tensor):
        """``(r_hat, bonus)``, each ``(B,)``."""
        preds, phis = self.ensemble.head_outputs(x)
        if self.kind == "ts":
            return preds[self.head], torch.zeros_like(preds[0])
        mean = preds.mean(0)
        if self.kind == "greedy":
            return mean, torch.zeros_like(mean)
        if self.kind == "bootstrap":
            raw = self.bonus_scale * preds.std(0, unbiased=False)
        else:
            raw = self.bonus_scale * self.temperature * self.ensemble.ucb_width(x, phis)
        return mean, self.saturate(raw)

    def saturate(self, raw: torch.Tensor) -> torch.Tensor:
        """``m tanh(raw / m)`` with ``m = bonus_cap * temperature`` (identity without a cap)."""
        if self.bonus_cap is None:
            return raw
        m = self.bonus_cap * self.temperature
        return m * torch.tanh(raw / m)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r, g = self.parts(x)
        return r + g
