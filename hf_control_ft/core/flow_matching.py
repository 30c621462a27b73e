"""Flow-matching samplers as controlled chains: exact Gaussian transitions (``docs/algorithms.md`` §11).

diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3 / SD3.5, FLUX) uses noise levels ``s`` from 1 (noise) to 0
(data), ``x_s = (1 - s) x_0 + s eps``, and a network that predicts the velocity ``v ≈ eps - x_0``, called with
``timestep = s * num_train_timesteps``. Its deterministic Euler step ``x' = x + (s' - s) v`` has no KL. The
stochastic step used here is the flow twin of DDIM's ``eta``: from the network's clean-sample and noise
estimates

    (1)  x0_hat = x - s v,      eps_hat = x + (1 - s) v

a step from level ``s`` to ``s' < s`` draws (``r = (1 - s) / (1 - s')``, so ``r = 0`` at ``s = 1``)

    (2)  sigma_k^2 = eta^2 s'^2 (1 - (r s' / s)^2),          c_k = sqrt(s'^2 - sigma_k^2)
    (3)  mu(x)     = (1 - s') x0_hat + c_k eps_hat = [(1 - s') + c_k] x + [c_k (1 - s) - s (1 - s')] v
    (4)  x'        = mu(x) + sigma_k xi,   xi ~ N(0, I)
    (5)  KL_k      = ||mu_ft - mu_pre||^2 / (2 sigma_k^2)
                   = (c_k (1 - s) - s (1 - s'))^2 ||v_ft - v_pre||^2 / (2 sigma_k^2)     (summed over dimensions)

At ``eta = 1`` (2) is the variance of the exact posterior ``q(x_s' | x_s, x_0)`` of the linear path and (3) its
mean at ``x_0 = x0_hat``: with the true ``x_0`` every marginal ``x_s`` is exact at *any* step count (DDIM's
argument), and with the model's posterior mean the chain loses a little variance at coarse steps, never adds
it (``tests/core/test_flow_matching.py`` checks Gaussian data of std 0.1 and 0.5 at 10-1000 steps against
diffusers' Euler ODE). Every step is finite -- no special first step: at ``s = 1``, ``r = 0``,
``sigma^2 = eta^2 s_1^2`` and ``c = sqrt(1 - eta^2) s_1``.

**Deterministic steps.** The last step (``s' = 0``) has ``sigma = 0``: it returns ``x0_hat``. A step whose KL
factor (5) is far above its neighbours' is deterministic too. At ``eta = 1`` and small ``s`` the factor depends only
on the level ratio ``rho = s' / s``: ``(1 - rho^2) / (2 rho^2)``: 1.5 at ``rho = 1/2``, 49.5 at ``rho = 1/10``. Any
control that leaks into such a step from its neighbours through the shared LoRA weights costs more than everything
else, and the trainer learns next to nothing (measured: tilted-target TV 0.22 instead of 0.07 on the flow mixture);
the KL-optimal control there is ``sigma^2 grad V / alpha``, negligible. Two structures make such steps:

* **the grid's floor.** diffusers' own grids (``sigmas=None``: SD3 / SD3.5) are linear in ``t`` from 1 down to a
  *floor* level, the scheduler's shifted minimum (0.0089 at ``shift=3``, 0.001 at ``shift=1``), then 0. A grid that
  approaches 0 in regular steps (FLUX's ``linspace(1, 1/K, K)``, shifted or not) ends with ``rho >= 1/2``; a floor
  makes the step into it smaller: ``rho = 0.032`` at 10 steps of ``shift=3``, 0.100 at 36, 0.13 at 50, 0.38 at
  200 (KL factor 3.0 against 0.8 for the step before). So the step into the last positive level is deterministic
  whenever ``rho < FLOOR_RATIO = 0.45``, at every step count -- a fixed ratio such as ``s' < s / 10`` stops
  catching it from 36 steps of ``shift=3`` (112 of ``shift=1``) on, where the step's factor is 27-48x the previous
  one's;
* **any jump** to below ``JUMP_RATIO = 1/10`` of its level (``s' < s / 10``) elsewhere in a custom grid.

Such steps run like DDIM's last step: ``mu`` of (3) at ``sigma = 0`` with the pretrained network, no control and no
KL (``tests/core/test_flow_matching.py`` checks every grid people run: 10 / 28 / 36 / 40 / 50 / 100 / 200 steps at
``shift`` 1 and 3, FLUX's dynamic shift at 512 and 1024 px). On FLUX's grid only the step to 0 is deterministic.
With too few steps no random step is left (1 step, or 2 on a floor grid): nothing can be controlled, and
:func:`check_controllable` refuses the schedule naming ``--num_inference_steps``.

**Where control ends.** The trained chain controls the levels from 1 down to ``control_end_level``, the level
after its last random step (SD3 ``shift=3``: 0.278 at 10 steps, 0.111 at 28; FLUX 1024 px at 28 steps: 0.105).
Below it the pretrained network runs and the adapter never receives a gradient. The stock ODE with the LoRA loaded
applies the adapter there too; :meth:`ControlCutoff` (``pipelines/callbacks.py``) switches it off below that level.

**Memory of the start.** ``eta = 1``: ``c = 0`` at ``s = 1``, so the first transition's mean is
``(1 - s_1) x0_hat(x_1)``, which with the exact velocity is ``(1 - s_1) E[x_0]`` whatever ``x_1``: the chain is
exactly memoryless, and fixed ``N(0, I)`` start noise is the optimal start law. ``eta < 1`` keeps
``sqrt(1 - eta^2) s_1`` of ``x_1`` in the first step (and more through later steps), exactly as DDIM does: the
fixed-start optimum is then biased (``docs/algorithms.md`` §3) and the learned initial noise removes the bias.
(In continuous time the flow SDE forgets ``x_1`` for every noise level ``> 0``; the memory is a property of the
discrete chain that people run, 10-50 steps.)

The Euler-Maruyama discretisation of the flow SDE that this module used before is not kept: at SD3 / FLUX
step counts it does not preserve the marginals (Gaussian data of std 0.1, shift 3: 63x the data variance at
10 steps, 2.6x at 28) and its first step needs an ad-hoc noise level.

:class:`FlowMatchSchedule` has the interface of :class:`~hf_control_ft.core.scheduling.DiffusionSchedule`
(both are :class:`~hf_control_ft.core.scheduling.GaussianTransitions`), so the sampler, the KL, adjoint
matching and the per-step values work unchanged; :func:`build_schedule` picks the schedule of a scheduler.
"""

from __future__ import annotations

import math

import torch

from .scheduling import VARIANCE_FLOOR, DiffusionSchedule, GaussianTransitions

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)

#: a step to a level below this fraction of its start level (``s' < s / 10``) is deterministic (module docstring)
JUMP_RATIO = 0.1
#: the step into the grid's last positive level is deterministic when ``s' / s`` is below this: the grid ends at a
#: floor (the scheduler's shifted minimum), not in regular steps toward 0 (``s' / s >= 1/2``; module docstring)
FLOOR_RATIO = 0.45


def is_flow_scheduler(scheduler) -> bool:
    return type(scheduler).__name__ in FLOW_SCHEDULERS


class FlowMatchSchedule(GaussianTransitions):
    """Closed-form Gaussian transitions (1)-(5) of a ``FlowMatchEulerDiscreteScheduler`` for one sampling run.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (``shift`` and dynamic shifting supported; a private copy
            is used, the caller's scheduler is not changed).
        num_inference_steps: ``K``.
        eta: in ``(0, 1]``; ``1`` is the exact posterior of the linear path (memoryless), smaller values keep
            ``sqrt(1 - eta^2)`` of the noise estimate in each step, as DDIM's ``eta`` does.
        mu: the resolution-dependent shift of ``use_dynamic_shifting=True`` schedulers (FLUX computes it from the
            image sequence length); required exactly when the scheduler shifts dynamically.
        sigmas: the unshifted noise levels the pipeline passes to ``set_timesteps`` (FLUX:
            ``linspace(1, 1/K, K)``); ``None``: the scheduler's own grid (SD3).

    Attributes:
        levels: ``(K,)`` float64 noise levels ``s_k`` (from 1 down), ``next_levels`` ``(K,)`` (down to 0).
        timesteps: ``(K,)`` float32 network timesteps ``s_k * num_train_timesteps``.
        std: ``(K,)`` float64 transition standard deviations ``sigma_k`` (2); ``0`` marks a deterministic step:
            the last one (``s' = 0``), the step into a floor level (``s' / s < FLOOR_RATIO`` into the last positive
            level) and a jump to a level below ``JUMP_RATIO`` of the start (module docstring).
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
            raise ValueError(f"eta must be in (0, 1] (1: the exact posterior of the flow path, as DDIM's eta), got "
                             f"{eta!r}; eta = 0 is a deterministic sampler, whose KL is infinite for any control")
        cfg = scheduler.config
        for key in ("invert_sigmas", "stochastic_sampling"):
            if cfg.get(key):
                raise ValueError(f"FlowMatchEulerDiscreteScheduler with {key}=True is not supported: the "
                                 "transitions would not be those of the flow path")
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
        s, s_next = self.levels, self.next_levels
        r = (1 - s) / (1 - s_next)  # 0 at s = 1: no special first step
        var = (self.eta * s_next) ** 2 * (1 - (r * s_next / s) ** 2)  # (2)
        jump = (s_next < JUMP_RATIO * s) | (var <= VARIANCE_FLOOR)  # s' = 0 and jumps to a tiny level
        if len(s) >= 2 and float(s_next[-2]) < FLOOR_RATIO * float(s[-2]):
            jump[-2] = True  # the step into the grid's floor level (module docstring)
        var = torch.where(jump, torch.zeros_like(var), var)  # deterministic (module docstring)
        self.std = var.sqrt()
        c = (s_next**2 - var).clamp(min=0).sqrt()
        self._c_x = (1 - s_next) + c  # (3) mu = c_x x + c_v v
        self._c_v = c * (1 - s) - s * (1 - s_next)

    def predict_x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor, k: int):
        """``(x0_hat, eps_hat) = (x - s v, x + (1 - s) v)`` at step ``k``."""
        s = float(self.levels[k])
        return sample - s * model_output, sample + (1 - s) * model_output

    def mean(self, model_output: torch.Tensor, sample: torch.Tensor, k: int) -> torch.Tensor:
        """Transition mean (3); differentiable in both arguments. ``model_output`` is the velocity."""
        return float(self._c_x[k]) * sample + float(self._c_v[k]) * model_output

    @property
    def control_end_level(self) -> float:
        """The noise level ``s`` after the last random step: the chain controls the levels ``1 -> s`` only (below,
        the pretrained network runs). ``0.0`` when every step down to ``s' = 0`` were random (never: the last step
        is deterministic)."""
        steps = self.random_steps()
        return float(self.next_levels[steps[-1]]) if steps else 1.0

    def kl_factor(self, k: int) -> float:
        """``KL_k / ||v_ft - v_pre||^2`` (5): ``(c_k (1 - s) - s (1 - s'))^2 / (2 sigma_k^2)``; stochastic steps
        only (the deterministic last step has no KL)."""
        if not self.is_stochastic(k):
            raise ValueError(f"step {k} is deterministic (s' = 0, the step into the grid's floor, or s' < s / 10): it "
                             "carries no control and no KL")
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
    """``eta`` whose transitions match, as steps shrink, the flow SDE of noise level ``sigma_s = a sqrt(s / (1 - s))``
    that GRPO-style trainers sample with (``a ≈ 0.7``): for small ``|ds|`` the variance (2) is
    ``eta^2 * 2 s / (1 - s) * |ds|``, that SDE's ``sigma_s^2 |ds|`` at ``eta = a / sqrt(2)``."""
    return float(a) / math.sqrt(2.0)


__all__ = ["FlowMatchSchedule", "build_schedule", "is_flow_scheduler", "memoryless_eta", "FLOW_SCHEDULERS",
           "JUMP_RATIO", "FLOOR_RATIO"]
