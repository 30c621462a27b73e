"""Fidelity metrics of the digits task: exact rejection sampling of the tilted law and the feature distances,
against closed forms."""

import math

import pytest
import torch

from hf_control_ft.tasks import digits
from hf_control_ft.tasks import digits_fidelity as fid


def _gaussian(n, mean, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.as_tensor(mean, dtype=torch.float64) + torch.randn(n, len(mean), generator=g,
                                                                    dtype=torch.float64) * torch.as_tensor(scale)


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
    # N(m1, diag(s1^2)) vs N(m2, diag(s2^2)): ||m1 - m2||^2 + sum (s1 - s2)^2
    m1, m2 = [0.0, 1.0, -2.0, 0.5], [0.3, 1.0, -1.0, 0.5]
    s1, s2 = [1.0, 0.5, 2.0, 0.1], [1.5, 0.5, 1.0, 0.3]
    exact = sum((a - b) ** 2 for a, b in zip(m1, m2)) + sum((a - b) ** 2 for a, b in zip(s1, s2))
    fd = fid.frechet_distance(_gaussian(200_000, m1, s1, 0), _gaussian(200_000, m2, s2, 1))
    assert fd == pytest.approx(exact, rel=0.02)
    # a rotated covariance: the matrix square root is not the elementwise one
    a = _gaussian(200_000, [0.0, 0.0], [1.0, 0.2], 2)
    rot = torch.tensor([[math.cos(0.7), -math.sin(0.7)], [math.sin(0.7), math.cos(0.7)]], dtype=torch.float64)
    b = _gaussian(200_000, [0.0, 0.0], [1.0, 0.2], 3) @ rot.T
    ca, cb = torch.diag(torch.tensor([1.0, 0.04], dtype=torch.float64)), rot @ torch.diag(
        torch.tensor([1.0, 0.04], dtype=torch.float64)) @ rot.T
    from scipy.linalg import sqrtm

    exact = float(torch.trace(ca + cb)) - 2 * float(sqrtm((ca @ cb).numpy()).real.trace())
    assert fid.frechet_distance(a, b) == pytest.approx(exact, rel=0.03)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_kernel_mmd_and_c2st_separate_laws_and_not_samples_of_one_law():
    a, b = _gaussian(2000, [0.0] * 8, [1.0] * 8, 0), _gaussian(2000, [0.0] * 8, [1.0] * 8, 1)
    c = _gaussian(2000, [0.5] + [0.0] * 7, [1.0] * 8, 2)
    same, diff = fid.kernel_mmd2(a, b), fid.kernel_mmd2(a, c)
    assert abs(same) < 0.01 < diff
    # unbiased: over independent pairs of one law the estimates average to 0 (to their standard error)
    pairs = [fid.kernel_mmd2(_gaussian(500, [0.0] * 8, [1.0] * 8, 10 + 2 * i),
                             _gaussian(500, [0.0] * 8, [1.0] * 8, 11 + 2 * i)) for i in range(20)]
    mean = sum(pairs) / 20
    se = (sum((v - mean) ** 2 for v in pairs) / 19 / 20) ** 0.5
    assert abs(mean) < 3 * se
    assert 0.45 < fid.c2st_accuracy(a, b) < 0.55
    assert fid.c2st_accuracy(a, c) > 0.55
    far = _gaussian(2000, [3.0] + [0.0] * 7, [1.0] * 8, 3)
    assert fid.c2st_accuracy(a, far) > 0.9


class _LinearProxy(torch.nn.Module):
    """A fixed 'classifier' of 8x8 images: logits = W flatten(x)."""

    def __init__(self):
        super().__init__()
        self.w = 0.3 * torch.randn(10, 64, generator=torch.Generator().manual_seed(5))

    def forward(self, x):
        logits = x.reshape(x.shape[0], -1) @ self.w.T
        return logits + torch.nn.functional.one_hot(torch.tensor(3), 10) * 3.0  # class 3 likely: q in 0.3..0.9


@pytest.mark.parametrize("alpha", [3.0, 1.0, 0.3])
def test_rejection_draws_the_exact_tilted_law_of_a_discrete_pretrained_law(alpha):
    """A 'pretrained sampler' over 6 fixed images with known weights: the accepted images' frequencies are
    p_i q_i^(1/alpha) / Z (q_i = p_proxy(3 | image i)) and the acceptance rate is Z."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 8, 8, generator=g) * 0.6 - 0.3
    p = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.07, 0.03], dtype=torch.float64)
    proxy = _LinearProxy()
    q = torch.softmax(proxy(images).double(), -1)[:, 3]

    def draw(n, gen):
        return images[torch.multinomial(p, n, replacement=True, generator=gen)]

    n = 20_000
    x, rate = fid.tilted_rejection_samples(draw, proxy, 3, alpha, n, torch.Generator().manual_seed(1))
    target = p * q ** (1 / alpha)
    z = float(target.sum())
    target = target / z
    idx = (x.reshape(n, 1, -1) == images.reshape(1, 6, -1)).all(-1).double().argmax(1)
    freq = torch.bincount(idx, minlength=6).double() / n
    assert x.shape == (n, 1, 8, 8)
    assert float((freq - target).abs().max()) < 4 * math.sqrt(0.25 / n)  # within 4 standard errors
    assert rate == pytest.approx(z, rel=0.05)


def test_rejection_reports_a_hopeless_acceptance_rate():
    def draw(n, gen):
        return torch.full((n, 1, 8, 8), 0.0)

    class Never(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 10)
            logits[:, 3] = -60.0
            return logits

    with pytest.raises(RuntimeError, match="only 0 of 10 samples accepted after 8192 pretrained draws"):
        fid.tilted_rejection_samples(draw, Never(), 3, 0.3, 10, torch.Generator().manual_seed(0), max_draws=8192)


def test_genuine_features_are_the_inputs_of_the_last_layer_and_histogram_tv():
    torch.manual_seed(0)
    clf = digits.DigitClassifier("cnn").eval()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    f = fid.genuine_features(clf, x)
    assert f.shape == (5, 128) and f.dtype == torch.float64
    torch.testing.assert_close(clf.net[-1](f.float()), clf(x), atol=1e-5, rtol=1e-5)
    h = fid.class_histogram(clf, x)
    assert float(h.sum()) == pytest.approx(1.0)
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.5])
    assert fid.class_histogram_tv(p, q) == pytest.approx(0.5)


def test_sample_summary_is_one_pass_of_features_and_histogram():
    torch.manual_seed(1)
    clf = digits.DigitClassifier("cnn").eval()
    x = torch.rand(40, 1, 8, 8) * 2 - 1
    summary = fid.sample_summary(clf, x)
    torch.testing.assert_close(summary["features"], fid.genuine_features(clf, x))
    torch.testing.assert_close(summary["histogram"], fid.class_histogram(clf, x))
    same = fid.fidelity_distances(summary, summary)
    assert same["frechet"] == pytest.approx(0.0, abs=1e-6) and same["class_tv"] == 0.0
