"""Gaussian mixtures: an exactly solvable test case for reward fine-tuning (``docs/algorithms.md`` §5).

Under the VP forward process ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`` a mixture stays a mixture, so the
exact noise prediction ``eps_hat(x, t) = -sqrt(1 - abar_t) grad log p_t(x)`` is available in closed form, and
for a linear reward ``r(x) = c . x`` the tilted target ``p(x) exp(r(x) / alpha) / Z`` is again a mixture. The
rectified flow ``x_s = (1 - s) x_0 + s eps`` of a mixture is one too, so its velocity is closed form as well
(:func:`exact_velocity`, ``docs/algorithms.md`` §11).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GaussianMixture:
    """``sum_j w_j N(m_j, S_j)``. ``weights`` ``(J,)``, ``means`` ``(J, D)``, ``covariances`` ``(J, D, D)``."""

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.covariances = torch.as_tensor(self.covariances, dtype=torch.float64)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, D)`` float32 samples."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covariances)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)).float()

    def noised(self, alpha_bar: float) -> "GaussianMixture":
        """The law of ``sqrt(abar) x_0 + sqrt(1 - abar) eps``."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, alpha_bar**0.5 * self.means,
                               alpha_bar * self.covariances + (1 - alpha_bar) * eye)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributions.MultivariateNormal(self.means, covariance_matrix=self.covariances)
        lp = dist.log_prob(x.double()[:, None, :]) + self.weights.log()[None]
        return torch.logsumexp(lp, dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``grad log p(x)``, ``(B, D)`` float64."""
        x = x.double().detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.log_prob(x).sum(), x)
        return g

    def tilted_linear(self, c: torch.Tensor, alpha: float) -> "GaussianMixture":
        """The exact target ``p(x) exp(c.x / alpha) / Z``."""
        c = torch.as_tensor(c, dtype=torch.float64)
        Sc = self.covariances @ c
        logw = self.weights.log() + self.means @ c / alpha + (c * Sc).sum(-1) / (2 * alpha**2)
        return GaussianMixture(torch.softmax(logw, 0), self.means + Sc / alpha, self.covariances)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest mode mean for each sample, ``(B,)``."""
        return torch.cdist(x.double(), self.means).argmin(dim=1)

    def mode_weight_tv(self, x: torch.Tensor) -> float:
        """Total-variation distance between the samples' mode frequencies and ``weights``."""
        counts = torch.bincount(self.assign(x), minlength=len(self.weights)).double()
        return float(0.5 * (counts / counts.sum() - self.weights).abs().sum())

    def mode_mean_errors(self, x: torch.Tensor) -> list[float]:
        """Euclidean error of each mode's sample mean (samples assigned to the nearest mode)."""
        a = self.assign(x)
        out = []
        for j in range(len(self.weights)):
            xs = x[a == j].double()
            out.append(float((xs.mean(0) - self.means[j]).norm()) if len(xs) else float("nan"))
        return out


class RejectionTilt:
    """The tilted law ``p(x) exp(r(x) / alpha) / Z`` of a mixture under a *bounded* reward ``r <= r_max``,
    sampled exactly by rejection (propose from ``p``, accept with probability ``exp((r(x) - r_max) / alpha)``).

    Mode statistics use the cells of the mixture's own means (``assign``: nearest pretrained mode mean), so they
    are defined for any reward; ``weights`` (``(J,)``, the target's mass in each cell) and ``means`` (``(J, D)``,
    its mean in each cell) are measured on ``num_reference`` exact target samples (Monte Carlo error about
    ``sqrt(w (1 - w) / num_reference)``, 4e-4 at a million samples).
    """

    def __init__(self, mixture: GaussianMixture, reward, alpha: float, r_max: float,
                 num_reference: int = 1_000_000, seed: int = 0):
        self.mixture, self.reward, self.alpha, self.r_max = mixture, reward, float(alpha), float(r_max)
        x = self.sample(num_reference, torch.Generator().manual_seed(seed))
        cells = self.assign(x)
        self.weights = torch.bincount(cells, minlength=len(mixture.weights)).double() / len(x)
        self.means = torch.stack([x[cells == j].double().mean(0) for j in range(len(mixture.weights))])

    @property
    def dim(self) -> int:
        return self.mixture.dim

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, D)`` float32 exact samples of the tilted law."""
        out, have = [], 0
        while have < n:
            x = self.mixture.sample(max(4 * (n - have), 1024), generator)
            r = self.reward(x).double()
            if bool((r > self.r_max + 1e-9).any()):
                raise ValueError(f"the reward reached {float(r.max()):.4g} > r_max = {self.r_max}")
            keep = torch.rand(len(x), generator=generator, dtype=torch.float64) < torch.exp((r - self.r_max)
                                                                                             / self.alpha)
            out.append(x[keep])
            have += int(keep.sum())
        return torch.cat(out)[:n]

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest *pretrained* mode mean for each sample, ``(B,)``."""
        return self.mixture.assign(x)

    def mode_weight_tv(self, x: torch.Tensor) -> float:
        """Total-variation distance between the samples' cell frequencies and the target's ``weights``."""
        counts = torch.bincount(self.assign(x), minlength=len(self.weights)).double()
        return float(0.5 * (counts / counts.sum() - self.weights).abs().sum())

    def mode_mean_errors(self, x: torch.Tensor) -> list[float]:
        """Euclidean error of each cell's sample mean against the target's mean in that cell."""
        a = self.assign(x)
        return [float((x[a == j].double().mean(0) - self.means[j]).norm()) if bool((a == j).any()) else float("nan")
                for j in range(len(self.weights))]


class BumpReward:
    """A bounded nonlinear reward ``r(x) = height * exp(-||x - center||^2 / (2 width^2))`` in ``[0, height]``;
    differentiable, picklable."""

    def __init__(self, center, height: float = 2.0, width: float = 1.5):
        self.center = torch.as_tensor(center, dtype=torch.float32)
        self.height, self.width = float(height), float(width)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d2 = (x - self.center.to(x)).pow(2).sum(-1)
        return self.height * torch.exp(-d2 / (2 * self.width**2))


class LinearReward:
    """``r(x) = c . x`` (picklable); its tilted law is :meth:`GaussianMixture.tilted_linear`."""

    def __init__(self, c):
        self.c = torch.as_tensor(c, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.c.to(x)


def linear_soft_value(mixture: GaussianMixture, c, alpha: float, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """``V(x) = alpha log E[exp(c . x_0 / alpha) | x_t = x]`` under the exact VP noising of ``mixture`` at
    ``abar = alpha_bar``: the soft value of the continuous-time pretrained process (``docs/algorithms.md`` §5),
    ``(B,)`` float64, differentiable in ``x``.

    Given ``x_t`` and component ``j``, ``x_0`` is Gaussian with precision ``P_j = S_j^{-1} + abar / (1 - abar) I``
    and mean ``P_j^{-1} (S_j^{-1} m_j + sqrt(abar) / (1 - abar) x_t)``; its exponential moment is closed form, and
    the components are weighted by their posterior responsibilities.
    """
    c = torch.as_tensor(c, dtype=torch.float64)
    a = float(alpha_bar)
    x = x.double()
    eye = torch.eye(mixture.dim, dtype=torch.float64)
    s_inv = torch.linalg.inv(mixture.covariances)  # (J, D, D)
    post_cov = torch.linalg.inv(s_inv + a / (1 - a) * eye)
    lin = torch.einsum("jde,je->jd", s_inv, mixture.means)[None] + (a**0.5 / (1 - a)) * x[:, None, :]
    post_mean = torch.einsum("jde,bje->bjd", post_cov, lin)  # (B, J, D)
    noised = mixture.noised(a)
    diff = x[:, None, :] - noised.means[None]
    sol = torch.linalg.solve(noised.covariances[None], diff.unsqueeze(-1)).squeeze(-1)
    log_resp = mixture.weights.log()[None] - 0.5 * (diff * sol).sum(-1) - 0.5 * torch.linalg.slogdet(
        noised.covariances).logabsdet[None]
    log_moment = post_mean @ c / alpha + (c @ post_cov @ c)[None] / (2 * alpha**2)
    return alpha * (torch.logsumexp(log_resp + log_moment, 1) - torch.logsumexp(log_resp, 1))


def exact_noise_prediction(mixture: GaussianMixture, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``eps_hat(x, t) = -sqrt(1 - abar_t) grad log p_t(x)`` for per-sample ``alpha_bar`` ``(B,)``; float32.

    Vectorised over samples: component ``j`` of ``p_t`` is ``N(sqrt(abar) m_j, abar S_j + (1 - abar) I)`` and
    ``grad log p_t(x) = sum_j gamma_j(x) C_j^{-1} (sqrt(abar) m_j - x)`` with responsibilities ``gamma_j``.
    """
    a = alpha_bar.double().reshape(-1, 1, 1, 1)
    eye = torch.eye(mixture.dim, dtype=torch.float64)
    cov = a * mixture.covariances[None] + (1 - a) * eye  # (B, J, D, D)
    diff = a[..., 0].sqrt() * mixture.means[None] - x.double()[:, None, :]  # (B, J, D)
    sol = torch.linalg.solve(cov, diff.unsqueeze(-1)).squeeze(-1)  # C^{-1} (mean - x)
    logdet = torch.linalg.slogdet(cov).logabsdet
    logp = mixture.weights.log()[None] - 0.5 * (diff * sol).sum(-1) - 0.5 * logdet
    gamma = torch.softmax(logp, dim=1)
    score = (gamma[..., None] * sol).sum(1)
    return (-(1 - alpha_bar.double()).sqrt()[:, None] * score).float()


def exact_velocity(mixture: GaussianMixture, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rectified-flow velocity ``v(x, s) = (x - E[x_0 | x_s = x]) / s`` for per-sample levels ``s`` ``(B,)``
    in ``(0, 1]`` (``docs/algorithms.md`` §11); float32.

    Component ``j`` of ``x_s = (1 - s) x_0 + s eps`` is ``N((1 - s) m_j, C_j)`` with ``C_j = (1 - s)^2 S_j +
    s^2 I``; ``E[x_0 | x_s, j] = m_j + (1 - s) S_j C_j^{-1} (x_s - (1 - s) m_j)``, weighted by the posterior
    responsibilities of the components.
    """
    a = (1 - s.double()).reshape(-1, 1, 1, 1)
    b = s.double().reshape(-1, 1, 1, 1)
    eye = torch.eye(mixture.dim, dtype=torch.float64)
    cov = a**2 * mixture.covariances[None] + b**2 * eye  # (B, J, D, D)
    diff = x.double()[:, None, :] - a[..., 0] * mixture.means[None]  # x - (1 - s) m_j, (B, J, D)
    sol = torch.linalg.solve(cov, diff.unsqueeze(-1)).squeeze(-1)  # C^{-1} (x - (1 - s) m_j)
    logdet = torch.linalg.slogdet(cov).logabsdet
    gamma = torch.softmax(mixture.weights.log()[None] - 0.5 * (diff * sol).sum(-1) - 0.5 * logdet, dim=1)
    x0_j = mixture.means[None] + a[..., 0] * torch.einsum("jde,bje->bjd", mixture.covariances, sol)
    x0 = (gamma[..., None] * x0_j).sum(1)
    return ((x.double() - x0) / s.double()[:, None]).float()


class ExactVelocity(torch.nn.Module):
    """The mixture's exact velocity (:func:`exact_velocity`) as a network called like a flow transformer
    (``model(sample, timestep)`` with ``timestep = s * 1000``): the pretrained model of closed-form checks."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return exact_velocity(self.mixture, sample, timestep.float() / 1000)


def _regress(model, loss_fn, steps: int, lr: float, desc: str, progress: bool):
    """Adam + cosine schedule on ``loss_fn()`` for ``steps``; returns ``model`` frozen, in eval mode."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.requires_grad_(False)
    return model.eval()


def distill_flow_velocity(mixture: GaussianMixture, steps: int = 1500, batch_size: int = 1024, hidden: int = 128,
                          depth: int = 3, lr: float = 2e-3, seed: int = 0, num_train_timesteps: int = 1000,
                          progress: bool = False):
    """Trains an :class:`~hf_control_ft.models.networks.MLPDenoiser` to the exact rectified-flow velocity of
    ``mixture`` (:func:`exact_velocity`), called as diffusers' flow pipelines call a transformer:
    ``model(x, timestep=s * num_train_timesteps)``. Levels ``s ~ U(0.001, 1)``. Returns it frozen, in eval mode."""
    from ..models.networks import MLPDenoiser

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLPDenoiser(dim=mixture.dim, hidden=hidden, depth=depth, num_train_timesteps=num_train_timesteps)

    def loss():
        x0 = mixture.sample(batch_size, gen)
        s = 0.001 + 0.999 * torch.rand(batch_size, generator=gen)
        xs = (1 - s)[:, None] * x0 + s[:, None] * torch.randn(x0.shape, generator=gen)
        return (model(xs, s * num_train_timesteps).sample - exact_velocity(mixture, xs, s)).pow(2).mean()

    return _regress(model, loss, steps, lr, "distil flow velocity", progress)


def three_mode_mixture() -> GaussianMixture:
    """The benchmark mixture: 2-D, weights (0.5, 0.3, 0.2), modes about 6 apart, covariance 0.25 I."""
    return GaussianMixture([0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 5.2]],
                           (0.25 * torch.eye(2)).expand(3, 2, 2).clone())


def four_mode_mixture_3d() -> GaussianMixture:
    """A 3-D mixture: weights (0.4, 0.3, 0.2, 0.1), modes 5-7 apart, anisotropic diagonal covariances."""
    means = [[-3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 4.0, 1.0], [0.0, -1.0, 4.5]]
    variances = [[0.3, 0.2, 0.25], [0.2, 0.35, 0.2], [0.25, 0.25, 0.4], [0.3, 0.2, 0.2]]
    return GaussianMixture([0.4, 0.3, 0.2, 0.1], means, torch.diag_embed(torch.tensor(variances)))


def class_conditional_mixtures() -> list[GaussianMixture]:
    """Three "prompts" over the modes of :func:`three_mode_mixture`, each with its own mode weights."""
    base = three_mode_mixture()
    weights = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]]
    return [GaussianMixture(w, base.means, base.covariances) for w in weights]


def distill_mixture_denoiser(mixture, scheduler, steps: int = 1500, batch_size: int = 1024, hidden: int = 128,
                             depth: int = 3, lr: float = 2e-3, seed: int = 0, progress: bool = False):
    """Trains an :class:`~hf_control_ft.models.networks.MLPDenoiser` to the exact noise prediction of ``mixture``.

    ``mixture``: one :class:`GaussianMixture`, or a list of them for a class-conditional denoiser (class ``c``
    is ``mixture[c]``; called as ``model(x, t, class_labels=c)``; classes drawn uniformly in training).
    Regression on ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`` with the closed-form target (lower variance than
    the usual ``eps`` target, same minimiser). Returns the frozen denoiser in eval mode.
    """
    from ..models.networks import MLPDenoiser

    mixtures = list(mixture) if isinstance(mixture, (list, tuple)) else [mixture]
    conditional = isinstance(mixture, (list, tuple))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLPDenoiser(dim=mixtures[0].dim, hidden=hidden, depth=depth,
                        num_train_timesteps=scheduler.config.num_train_timesteps,
                        num_classes=len(mixtures) if conditional else 0)
    abar = scheduler.alphas_cumprod

    def loss():
        labels = torch.randint(0, len(mixtures), (batch_size,), generator=gen) if conditional else None
        x0 = torch.zeros(batch_size, mixtures[0].dim)
        for c, m in enumerate(mixtures):
            idx = (labels == c).nonzero().flatten() if conditional else torch.arange(batch_size)
            x0[idx] = m.sample(len(idx), gen)
        t = torch.randint(0, len(abar), (batch_size,), generator=gen)
        a = abar[t]
        xt = a.sqrt()[:, None] * x0 + (1 - a).sqrt()[:, None] * torch.randn(x0.shape, generator=gen)
        target = torch.zeros_like(xt)
        for c, m in enumerate(mixtures):
            idx = (labels == c).nonzero().flatten() if conditional else torch.arange(batch_size)
            target[idx] = exact_noise_prediction(m, xt[idx], a[idx])
        kwargs = {"class_labels": labels} if conditional else {}
        return (model(xt, t, **kwargs).sample - target).pow(2).mean()

    return _regress(model, loss, steps, lr, "distil mixture denoiser", progress)

