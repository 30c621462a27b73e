"""Fidelity to the tilted law on the digits task: exact target samples and distances in a classifier's features.

With the digits reward ``r(x) = log p_proxy(c | x)`` (:class:`~hf_control_ft.tasks.digits.DigitReward`) the tilt
factor is ``exp(r(x) / alpha) = p_proxy(c | x)^(1 / alpha) <= 1``. Accepting each pretrained sample ``x`` with that
probability therefore draws **exact** samples of the tilted law ``p_pre(x) exp(r(x) / alpha) / Z`` (rejection
sampling with envelope ``p_pre``, acceptance rate ``Z = E_pre[p_proxy(c | x)^(1 / alpha)]``), for any alpha. Here
``p_pre`` is the pretrained *sampler's* law (the same chain, step count and eta that fine-tuning controls), which
is what ELEGANT's optimum tilts.

Distances between a model's samples and exact ones are measured in the *genuine* classifier's penultimate features
(the 128 activations before its last linear layer; that classifier never saw the proxy's half of the data):

* :func:`frechet_distance` -- ``||m_1 - m_2||^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2))`` of Gaussian fits (FID's
  formula in these features);
* :func:`kernel_mmd2` -- the unbiased squared MMD with KID's cubic polynomial kernel ``(x . y / d + 1)^3``;
* :func:`c2st_accuracy` -- a classifier two-sample test: held-out accuracy of a logistic regression telling the
  two sets apart (0.5 = indistinguishable);
* :func:`class_histogram_tv` -- total variation between the genuine classifier's class histograms.

Each has a floor -- the value between two independent exact sets of the same size -- which is what sampling
error alone gives; :func:`fidelity_distances` returns a model's values (on :func:`sample_summary` results, so each
set passes through the classifier once) next to it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import NUM_CLASSES


@torch.no_grad()
def genuine_features(classifier: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Penultimate activations ``(B, hidden)`` (float64) of a :class:`~hf_control_ft.tasks.digits.DigitClassifier`
    for images ``x`` ``(B, 1, 8, 8)`` in ``[-1, 1]``: every layer of ``classifier.net`` but the last linear one."""
    body = classifier.net[:-1]
    return torch.cat([body(x[i:i + batch_size].float()) for i in range(0, x.shape[0], batch_size)]).double()


@torch.no_grad()
def tilted_rejection_samples(draw_pretrained, proxy: nn.Module, target_digit: int, alpha: float, num_samples: int,
                             generator: torch.Generator, batch_size: int = 4096, max_draws: int = 5_000_000):
    """Exact samples of ``p_pre(x) p_proxy(target | x)^(1 / alpha) / Z`` by rejection from the pretrained sampler.

    Args:
        draw_pretrained: ``(n, generator) -> (n, 1, 8, 8)`` samples of the pretrained sampler.
        proxy: the reward's classifier (the tilt is ``exp(log p_proxy(target | x) / alpha)``).
        alpha: KL weight of the objective (> 0).
        num_samples: accepted samples to return.
        generator: CPU generator for the draws and the acceptance coins.

    Returns:
        ``(samples (num_samples, 1, 8, 8), acceptance_rate)``; the rate estimates ``Z``.

    Raises:
        RuntimeError: when ``max_draws`` pretrained samples did not give ``num_samples`` acceptances.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    accepted, drawn, count = [], 0, 0
    while count < num_samples:
        if drawn >= max_draws:
            raise RuntimeError(f"only {count} of {num_samples} samples accepted after {drawn} pretrained draws "
                               f"(alpha {alpha}: acceptance {count / drawn:.2e}); raise max_draws or alpha")
        x = draw_pretrained(batch_size, generator)
        log_accept = F.log_softmax(proxy(x.float()), dim=-1)[:, target_digit].double() / alpha
        coins = torch.rand(x.shape[0], generator=generator, dtype=torch.float64)
        keep = coins.log() < log_accept
        accepted.append(x[keep])
        count += int(keep.sum())
        drawn += x.shape[0]
    return torch.cat(accepted)[:num_samples], count / drawn


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of feature sets ``a`` ``(N, d)`` and ``b`` ``(M, d)``.

    ``tr (C_a C_b)^(1/2)`` is computed as ``sum sqrt(eig(S C_b S))`` with ``S = C_a^(1/2)`` (symmetric, float64),
    which is exact for positive semi-definite covariances."""
    a, b = a.double(), b.double()
    mean_term = float((a.mean(0) - b.mean(0)).pow(2).sum())
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    s = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(s @ cb @ s).clamp_min(0).sqrt().sum()
    return mean_term + float(torch.trace(ca) + torch.trace(cb) - 2 * cross)


def kernel_mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased squared MMD of feature sets ``a`` ``(N, d)``, ``b`` ``(M, d)`` with the kernel
    ``k(x, y) = (x . y / d + 1)^3`` (KID's); 0 in expectation when both come from one law."""
    a, b = a.double(), b.double()
    d = a.shape[1]
    kaa, kbb, kab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    n, m = a.shape[0], b.shape[0]
    return float((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
                 - 2 * kab.mean())


def c2st_accuracy(a: torch.Tensor, b: torch.Tensor, seed: int = 0, folds: int = 2) -> float:
    """Classifier two-sample test: mean held-out accuracy (``folds``-fold) of an L2-regularised logistic regression
    on standardised features telling ``a`` from ``b`` (equal sizes expected); 0.5 means indistinguishable."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = torch.cat([a, b]).double().numpy()
    y = [0] * a.shape[0] + [1] * b.shape[0]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv, scoring="accuracy").mean())


@torch.no_grad()
def class_histogram(classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's predicted-class frequencies ``(10,)`` (float64) over samples ``x``."""
    pred = torch.cat([classifier(x[i:i + 4096].float()).argmax(-1) for i in range(0, x.shape[0], 4096)])
    return torch.bincount(pred, minlength=NUM_CLASSES).double() / x.shape[0]


def class_histogram_tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation ``sum |p - q| / 2`` between two class histograms."""
    return float((p - q).abs().sum() / 2)


@torch.no_grad()
def sample_summary(classifier: nn.Module, x: torch.Tensor) -> dict:
    """What the distances need of a sample set, from one pass of the classifier: ``{"features": (B, hidden)
    float64 penultimate activations, "histogram": (10,) predicted-class frequencies}``."""
    features = genuine_features(classifier, x)
    pred = classifier.net[-1](features.float()).argmax(-1)
    return {"features": features, "histogram": torch.bincount(pred, minlength=NUM_CLASSES).double() / x.shape[0]}


def fidelity_distances(samples: dict, reference: dict, seed: int = 0) -> dict:
    """Fréchet distance, kernel MMD^2, C2ST accuracy and class-histogram TV between two
    :func:`sample_summary` results (a model's samples, exact tilted samples), as plain floats."""
    fa, fb = samples["features"], reference["features"]
    tv = class_histogram_tv(samples["histogram"], reference["histogram"])
    return {"frechet": round(frechet_distance(fa, fb), 4), "mmd2": round(kernel_mmd2(fa, fb), 5),
            "c2st": round(c2st_accuracy(fa, fb, seed), 4), "class_tv": round(tv, 4)}


__all__ = ["genuine_features", "tilted_rejection_samples", "frechet_distance", "kernel_mmd2", "c2st_accuracy",
           "class_histogram", "class_histogram_tv", "sample_summary", "fidelity_distances"]
