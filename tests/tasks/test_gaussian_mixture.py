"""The exact targets and values of the Gaussian-mixture benchmarks (docs/algorithms.md §5)."""

import pytest
import torch

from hf_control_ft.tasks.gaussian_mixture import (
    BumpReward,
    LinearReward,
    RejectionTilt,
    four_mode_mixture_3d,
    linear_soft_value,
    three_mode_mixture,
)


def test_rejection_tilt_of_a_linear_reward_matches_the_closed_form_tilt():
    """A linear reward bounded on the region the mixture occupies: rejection sampling against a large r_max gives
    the closed-form tilted weights and means (up to Monte Carlo error)."""
    mixture, c, alpha = three_mode_mixture(), torch.tensor([0.5, 0.3]), 2.0
    exact = mixture.tilted_linear(c, alpha)
    tilt = RejectionTilt(mixture, LinearReward(c), alpha, r_max=5.0, num_reference=200_000, seed=0)
    assert torch.allclose(tilt.weights, exact.weights, atol=5e-3), (tilt.weights, exact.weights)
    assert torch.allclose(tilt.means, exact.means, atol=0.02)
    x = exact.sample(20_000, torch.Generator().manual_seed(1))
    assert tilt.mode_weight_tv(x) < 0.01 and max(tilt.mode_mean_errors(x)) < 0.03


def test_rejection_tilt_refuses_a_reward_above_its_bound():
    with pytest.raises(ValueError, match="r_max"):
        RejectionTilt(three_mode_mixture(), LinearReward([0.5, 0.3]), 1.0, r_max=0.5, num_reference=1000)


def test_bounded_3d_target_moves_mass_to_the_rare_mode():
    mixture = four_mode_mixture_3d()
    reward = BumpReward([1.0, -1.0, 3.5], height=2.0, width=1.5)
    x = mixture.sample(1000, torch.Generator().manual_seed(0))
    r = reward(x)
    assert float(r.min()) >= 0 and float(r.max()) <= 2.0
    tilt = RejectionTilt(mixture, reward, 1.0, r_max=2.0, num_reference=100_000)
    assert abs(float(tilt.weights.sum()) - 1) < 1e-9
    assert float(tilt.weights[3]) > 2.5 * float(mixture.weights[3])  # the rare mode next to the bump gains
    assert 0.5 * float((tilt.weights - mixture.weights).abs().sum()) > 0.15  # 0.168


@pytest.mark.parametrize("abar", [0.005, 0.3, 0.95])
def test_linear_soft_value_satisfies_the_tower_property(abar):
    """E_{x_t}[exp(V_t(x_t) / alpha)] = E[exp(c . x_0 / alpha)] (closed form) at every noise level, and V_t -> c . x
    as abar -> 1."""
    mixture, c, alpha = three_mode_mixture(), torch.tensor([0.5, 0.3]), 2.0
    cd = c.double()
    log_moment = torch.logsumexp(mixture.weights.log() + mixture.means @ cd / alpha
                                 + (cd @ mixture.covariances @ cd) / (2 * alpha**2), 0)
    gen = torch.Generator().manual_seed(0)
    x0 = mixture.sample(200_000, gen)
    xt = abar**0.5 * x0 + (1 - abar) ** 0.5 * torch.randn(x0.shape, generator=gen)
    v = linear_soft_value(mixture, c, alpha, xt, abar)
    estimate = torch.logsumexp(v / alpha, 0) - torch.log(torch.tensor(float(len(v)), dtype=torch.float64))
    assert abs(float(estimate - log_moment)) < 0.01
    x = torch.randn(5, 2, generator=gen)
    assert torch.allclose(linear_soft_value(mixture, c, alpha, x, 1 - 1e-7), (x @ c).double(), atol=1e-3)
