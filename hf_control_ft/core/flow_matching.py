"""Flow-matching samplers as controlled SDEs: exact per-step Gaussian transitions (``docs/algorithms.md`` §11).

diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3 / SD3.5, FLUX) uses noise levels ``s`` from 1 (noise) to 0
(data), ``x_s = (1 - s) x_0 + s eps``, and a network that predicts the velocity ``v ≈ eps - x_0``, called with
``timestep = s * num_train_timesteps``. Its deterministic Euler step ``x' = x + (s' - s) v`` has no KL. The
stochastic sampler with the same marginals (step ``ds = s' - s < 0``, noise level ``sigma_s``) is

    (1)  mu(x) = x + ds * [ v + sigma_s^2 / (2 s) * (x + (1 - s) v) ]      (score: -(x + (1 - s) v) / s)
    (2)  x'    = mu(x) + sigma_s * sqrt(|ds|) * xi,   xi ~ N(0, I)
    (3)  KL_k  = ||mu_ft - mu_pre||^2 / (2 sigma_s^2 |ds|)                  (summed over every dimension)

with ``sigma_s = eta * sqrt(2 s / (1 - s))``: ``eta = 1`` is the memoryless schedule (the start ``x_1`` and
the sample are independent under the pretrained SDE), ``eta ≈ 0.5`` the level of GRPO-style trainers
(``a = eta sqrt(2) ≈ 0.7``). Below ``eta = 1`` fixed ``N(0, I)`` start noise biases the KL-regularised optimum;
the learned initial noise removes that bias.

**The first step, at s = 1.** ``sigma_s`` is infinite there. The step from ``s_0 = 1`` evaluates the noise
level at its *end*, ``sigma_{s_1}``: (1) stays finite (at ``s = 1`` the score is ``-x``, exactly that of
``N(0, I)``), and the step injects the noise the SDE would have at ``s_1``. Every other step uses the level at
its start. All steps are stochastic (``sigma > 0`` for ``eta > 0``), the last one included, so every step can
be controlled at a finite, exact KL. ``tests/core/test_flow_matching.py`` checks (1)-(3) against closed forms
and the chain against the exact mixture marginals.

:class:`FlowMatchSchedule` has the interface of :class:`~hf_control_ft.core.scheduling.DiffusionSchedule`
(both are :class:`~hf_control_ft.core.scheduling.GaussianTransitions`), so the sampler, the KL, adjoint
matching and the per-step values work unchanged; :func:`build_schedule` picks the schedule of a scheduler.
"""

from __future__ import annotations

import math

import torch

from .scheduling import DiffusionSchedule, GaussianTransitions

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_scheduler(scheduler) -> bool:
    return type(scheduler).__name__ in FLOW_SCHEDULERS


class FlowMatchSchedule(GaussianTransitions):
    """Closed-form stochastic transitions (1)-(3) of a ``FlowMatchEulerDiscreteScheduler`` for one sampling run.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (``shift`` and dynamic shifting supported; a private copy
            is used, the caller's scheduler is not changed).
        num_inference_steps: ``K``.
        eta: fraction of the memoryless noise level, in ``(0, 1]``.
        mu: the resolution-dependent shift of ``use_dynamic_shifting=True`` schedulers (FLUX computes it from the
            image sequence length); required exactly when the scheduler shifts dynamically.
        sigmas: the unshifted noise levels the pipeline passes to ``set_timesteps`` (FLUX:
            ``linspace(1, 1/K, K)``); ``None``: the scheduler's own grid (SD3).

    Attributes:
        levels: ``(K,)`` float64 noise levels ``s_k`` (from 1 down), ``next_levels`` ``(K,)`` (down to 0).
        timesteps: ``(K,)`` float32 network timesteps ``s_k * num_train_timesteps``.
        noise_level: ``(K,)`` float64 ``sigma`` of each step (the first evaluated at ``s_1``, module docstring).
        std: ``(K,)`` float64 transition standard deviations ``sigma sqrt(|ds|)``.
    """

    is_ddpm = False

    def __init__(self, scheduler, num_inference_steps: int, eta: float = 1.0, mu: float | None = None,
                 sigmas: list[float] | None = None):
        if not is_flow_scheduler(scheduler):
            raise TypeError(f"FlowMatchSchedule needs a FlowMatchEulerDiscreteScheduler, got "
                            f"{type(scheduler).__name__}")
        if not (isinstance(num_inference_steps, int) and num_inference_steps >= 1):
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if not (isinstance(eta, (int, float)) and 0.0 < float(eta) <= 1.0):
            raise ValueError(f"eta must be in (0, 1] (a fraction of the memoryless noise level "
                             f"sigma_s = sqrt(2 s / (1 - s))), got {eta!r}; eta = 0 is the deterministic Euler "
                             "sampler, whose KL is infinite for any control")
        cfg = scheduler.config
        for key in ("invert_sigmas", "stochastic_sampling"):
            if cfg.get(key):
                raise ValueError(f"FlowMatchEulerDiscreteScheduler with {key}=True is not supported: the "
                                 "transitions would not be those of the flow SDE")
        if cfg.get("use_dynamic_shifting") and mu is None:
            raise ValueError("this FlowMatchEulerDiscreteScheduler shifts its noise levels with the image size "
                             "(use_dynamic_shifting=True): pass mu (the pipeline's shift for its sequence length), "
                             "e.g. ElegantTrainer(config, reward_fn=..., process=ControlledProcess(model, scheduler, "
                             "sample_shape, config, schedule_options={'mu': mu}))")
        self.scheduler = type(scheduler).from_config(cfg)
        self.num_inference_steps = num_inference_steps
        self.eta = float(eta)
        self.mu = mu
        mu = mu if cfg.get("use_dynamic_shifting") else None
        if sigmas is None:
            self.scheduler.set_timesteps(num_inference_steps, mu=mu)
        else:
            if len(sigmas) != num_inference_steps:
                raise ValueError(f"{len(sigmas)} sigmas for num_inference_steps={num_inference_steps}")
            self.scheduler.set_timesteps(sigmas=list(sigmas), mu=mu)
        sigmas = self.scheduler.sigmas.double()
        if not (bool((sigmas[1:] < sigmas[:-1]).all()) and float(sigmas[0]) <= 1.0 + 1e-6 and float(sigmas[-1]) >= 0):
            raise ValueError(f"the scheduler's noise levels must decrease from <= 1 to >= 0, got {sigmas.tolist()}")
        self.levels, self.next_levels = sigmas[:-1].clamp(max=1.0), sigmas[1:]
        self.timesteps = (self.levels * cfg.num_train_timesteps).float()
        ds = self.next_levels - self.levels  # < 0
        at = torch.where(self.levels >= 1.0, self.next_levels, self.levels)  # (first step) level of sigma
        self.noise_level = self.eta * torch.sqrt(2 * at / (1 - at))
        self.std = self.noise_level * ds.abs().sqrt()
        c = self.noise_level**2 / (2 * self.levels)  # sigma^2 / (2 s)
        self._c_x = 1 + ds * c  # (1) mu = c_x x + c_v v
        self._c_v = ds * (1 + c * (1 - self.levels))

    def predict_x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor, k: int):
        """``(x0_hat, eps_hat) = (x - s v, x + (1 - s) v)`` at step ``k``."""
        s = float(self.levels[k])
        return sample - s * model_output, sample + (1 - s) * model_output

    def mean(self, model_output: torch.Tensor, sample: torch.Tensor, k: int) -> torch.Tensor:
        """Transition mean (1); differentiable in both arguments. ``model_output`` is the velocity."""
        return float(self._c_x[k]) * sample + float(self._c_v[k]) * model_output

    def kl_factor(self, k: int) -> float:
        """``KL_k / ||v_ft - v_pre||^2`` (3): ``|ds| (1 + sigma^2 (1 - s) / (2 s))^2 / (2 sigma^2)``."""
        return float(self._c_v[k] ** 2 / (2 * self.std[k] ** 2))


def build_schedule(scheduler, num_inference_steps: int, eta: float, mu: float | None = None,
                   sigmas: list[float] | None = None):
    """The closed-form schedule of ``scheduler``: :class:`FlowMatchSchedule` for flow matching,
    :class:`~hf_control_ft.core.scheduling.DiffusionSchedule` for DDPM / DDIM (others are refused there)."""
    if is_flow_scheduler(scheduler):
        return FlowMatchSchedule(scheduler, num_inference_steps, eta, mu=mu, sigmas=sigmas)
    if mu is not None or sigmas is not None:
        raise ValueError("mu and sigmas (flow-matching noise levels) apply to flow-matching schedulers only")
    return DiffusionSchedule(scheduler, num_inference_steps, eta)


def memoryless_eta(a: float) -> float:
    """``eta`` of the family ``sigma_s = a sqrt(s / (1 - s))`` (GRPO-style trainers use ``a ≈ 0.7``)."""
    return float(a) / math.sqrt(2.0)


__all__ = ["FlowMatchSchedule", "build_schedule", "is_flow_scheduler", "memoryless_eta", "FLOW_SCHEDULERS"]
