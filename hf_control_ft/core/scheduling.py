"""Per-step Gaussian transitions of diffusers' stochastic samplers.

A stochastic scheduler step (``DDPMScheduler`` or ``DDIMScheduler`` with ``eta > 0``) draws

    x_{k+1} ~ N( mu_k(x_k, model_output), sigma_k^2 I )

where ``sigma_k`` depends only on the noise schedule and ``eta`` and ``mu_k`` is an explicit function of
the network's prediction. :class:`DiffusionSchedule` computes ``mu_k`` and ``sigma_k`` in closed form,
mirroring ``scheduler.step`` line by line, so that the same code gives the pretrained mean, the fine-tuned
mean, their KL and the log-probability of a transition. ``tests/test_scheduling.py`` checks it against
``scheduler.step`` itself.

Index convention (see ``docs/algorithms.md`` §1): step ``k = 0 .. K-1`` goes from ``timesteps[k]`` to the next
lower noise level; ``x_0`` in the docs is the final sample the reward sees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

logger = logging.getLogger(__name__)

SUPPORTED_SCHEDULERS = (DDPMScheduler, DDIMScheduler)

# diffusers floors a zero DDPM posterior variance at 1e-20 (``DDPMScheduler._get_variance``). Such a step adds
# noise of standard deviation 1e-10: numerically deterministic, and a KL divided by 2e-20 is meaningless
# (``docs/algorithms.md`` §10). Any step with a variance at or below this floor is treated as
# deterministic: it runs the pretrained network and carries no KL and no control.
VARIANCE_FLOOR = 1e-20

#: a step into low noise (``sqrt(1 - alpha_bar') < LOW_NOISE``) that shrinks the noise level ``sqrt(1 - alpha_bar)``
#: by more than this factor is deterministic (``JUMP_FACTOR``; :class:`DiffusionSchedule`, ``docs/algorithms.md`` §7)
JUMP_FACTOR = 0.45
LOW_NOISE = 0.5


class GaussianTransitions:
    """What every closed-form schedule shares: ``timesteps`` ``(K,)`` fed to the network and ``std`` ``(K,)``
    of the transitions ``x_{k+1} ~ N(mean(model_output, x_k, k), std_k^2 I)``; a subclass defines ``mean``."""

    def __len__(self) -> int:
        return len(self.timesteps)

    def timestep(self, k: int) -> torch.Tensor:
        """The network's timestep at step ``k`` (a 0-dim tensor)."""
        return self.timesteps[k]

    def is_stochastic(self, k: int) -> bool:
        return bool(self.std[k] > 0)

    def random_steps(self) -> list[int]:
        """The steps with noise (``std_k > 0``): the only ones that carry control and KL."""
        return [k for k in range(len(self)) if self.is_stochastic(k)]

    @property
    def control_end_timestep(self) -> float | None:
        """The network timestep of the first step after the last random one, or ``None`` when the last random step
        is the chain's last step. At and below it the chain runs the pretrained network: the adapter was never
        trained there (``pipelines/callbacks.py::ControlCutoff`` switches it off there in other samplers)."""
        steps = self.random_steps()
        if not steps or steps[-1] + 1 >= len(self):
            return None
        return float(self.timesteps[steps[-1] + 1])

    def step(self, model_output, sample, k: int, noise: torch.Tensor | None) -> torch.Tensor:
        """One transition: ``mean + std_k * noise`` (``noise`` ~ N(0, I), ignored where ``std_k = 0``)."""
        return self.step_from_mean(self.mean(model_output, sample, k), k, noise)

    def step_from_mean(self, mu: torch.Tensor, k: int, noise: torch.Tensor | None) -> torch.Tensor:
        """``mu + std_k * noise``; ``noise`` may be ``None`` on deterministic steps."""
        s = self.std[k].item()
        if s == 0 or noise is None:
            return mu
        return mu + s * noise


@dataclass
class DiffusionSchedule(GaussianTransitions):
    """Closed-form transition coefficients of a diffusers scheduler for one sampling run.

    Args:
        scheduler: a ``DDPMScheduler`` or ``DDIMScheduler``. Its ``set_timesteps`` is called.
        num_inference_steps: number of denoising steps ``K``.
        eta: DDIM stochasticity in ``(0, 1]``; ``eta = 1`` is the DDPM posterior variance. A
            ``DDPMScheduler`` has a fixed variance and accepts only ``eta = 1``.

    Attributes:
        timesteps: ``(K,)`` integer timesteps fed to the network, highest noise first.
        std: ``(K,)`` float64 standard deviations ``sigma_k``; ``0`` marks a deterministic step: the last
            DDPM step (at ``t = 0``, or the floored-variance last step of ``steps_offset=1`` / ``"trailing"``
            spacing), the last DDIM step when its previous ``alpha_bar`` is 1, and a *jump* into low noise (below).
            Deterministic steps cannot be controlled at finite KL, so the sampler runs them with the pretrained
            network.

    **Jumps into low noise.** diffusers' grids end at the smallest training timestep (``t = 1`` with
    ``steps_offset=1``, every SD config; ``t = 0`` otherwise): at 50 steps of SD's schedule the step ``t = 21 -> 1``
    shrinks the noise level ``sqrt(1 - alpha_bar)`` to 0.29 of itself, at 10 steps to 0.12, at 15 DDPM steps of
    the cosine schedule ``t = 66 -> 0`` to 0.06. Its noise is then so small that its KL per unit of noise-prediction
    difference is 10-300x the step before's (5.4 against 0.5 on SD at 50 steps, eta 1; 164 against 1.3 on the
    digits chain), so any control leaking into it through the shared LoRA weights costs more than all other steps:
    measured on digits, the drift spent most of its KL there from its first iteration. At low noise that factor
    depends on the level ratio ``rho`` alone, ``(1 - rho^2) / (2 rho^2)`` at eta 1 (1.5 for a halving step), as on
    the flow grids (``core/flow_matching.py``). So a step into low noise (``sqrt(1 - alpha_bar') < LOW_NOISE``)
    with ``rho < JUMP_FACTOR`` runs as DDIM's ``eta = 0`` step -- deterministic, pretrained, no control, no KL --
    which keeps the marginals (a DDPM chain's too). The regular steps of these grids have ``rho >= 0.47``.
    """

    scheduler: DDPMScheduler | DDIMScheduler
    num_inference_steps: int
    eta: float = 1.0

    def __post_init__(self):
        sched = self.scheduler
        if not isinstance(sched, SUPPORTED_SCHEDULERS):
            raise TypeError(
                f"scheduler must be a diffusers DDPMScheduler or DDIMScheduler, got {type(sched).__name__}"
            )
        if not (isinstance(self.num_inference_steps, int) and self.num_inference_steps >= 1):
            raise ValueError(f"num_inference_steps must be an int >= 1, got {self.num_inference_steps!r}")
        if not (0.0 < float(self.eta) <= 1.0):
            raise ValueError(
                f"eta must be in (0, 1], got {self.eta}. eta = 0 (deterministic DDIM) has sigma_k = 0 at every "
                "step, so any control has infinite KL: use eta > 0 for training."
            )
        # work on a private copy: set_timesteps below must not change the caller's scheduler
        sched = self.scheduler = type(sched).from_config(sched.config)
        cfg = sched.config
        if cfg.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
        if cfg.thresholding:
            raise ValueError("dynamic thresholding (scheduler.config.thresholding=True) is not supported")
        is_ddpm = isinstance(sched, DDPMScheduler)
        if is_ddpm and float(self.eta) != 1.0:
            raise ValueError(
                f"DDPMScheduler has a fixed variance and takes eta = 1.0 only, got eta={self.eta}; "
                "use DDIMScheduler for eta < 1"
            )
        if is_ddpm and cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise ValueError(f"DDPMScheduler variance_type {cfg.variance_type!r} is not supported")

        sched.set_timesteps(self.num_inference_steps)
        self.timesteps = sched.timesteps.clone().long()
        abar = sched.alphas_cumprod.double()
        if cfg.prediction_type == "epsilon" and float(abar[self.timesteps[0]]) < 1e-12:
            raise ValueError(
                "zero terminal SNR (alpha_bar = 0 at the first timestep, e.g. rescale_betas_zero_snr=True) with "
                "prediction_type='epsilon': the clean-sample estimate (x - sqrt(1 - alpha_bar) eps) / "
                "sqrt(alpha_bar) divides by 0. Use a v_prediction model with zero-terminal-SNR schedules."
            )
        a_t, a_prev, std, c_x0, c_eps, c_x = [], [], [], [], [], []
        for i, t in enumerate(self.timesteps.tolist()):
            if is_ddpm:
                prev = self.timesteps[i + 1].item() if i + 1 < len(self.timesteps) else -1
                ap = abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
            else:
                prev = t - cfg.num_train_timesteps // self.num_inference_steps
                ap = abar[prev] if prev >= 0 else sched.final_alpha_cumprod.double()
            at = abar[t]
            if is_ddpm:
                cur_alpha = at / ap
                cur_beta = 1 - cur_alpha
                # mean = c_x0 * pred_x0 + c_x * x   (DDPM posterior mean)
                c_x0.append(ap.sqrt() * cur_beta / (1 - at))
                c_x.append(cur_alpha.sqrt() * (1 - ap) / (1 - at))
                c_eps.append(torch.tensor(0.0, dtype=torch.float64))
                if t == 0:
                    var = torch.tensor(0.0, dtype=torch.float64)  # diffusers adds no noise at t = 0
                elif cfg.variance_type == "fixed_large":
                    var = cur_beta
                else:  # fixed_small and fixed_small_log share the posterior variance
                    var = (1 - ap) / (1 - at) * cur_beta
                if var <= VARIANCE_FLOOR:
                    # (1) diffusers floors this variance at 1e-20 and adds 1e-10 * noise: a deterministic step
                    var = torch.tensor(0.0, dtype=torch.float64)
                std.append(var.sqrt())
            else:
                var = (1 - ap) / (1 - at) * (1 - at / ap)
                if var <= VARIANCE_FLOOR:  # previous alpha_bar = 1 (set_alpha_to_one): deterministic
                    var = torch.tensor(0.0, dtype=torch.float64)
                s = float(self.eta) * var.sqrt()
                std.append(s)
                # mean = sqrt(abar_prev) * pred_x0 + sqrt(1 - abar_prev - s^2) * pred_eps
                c_x0.append(ap.sqrt())
                c_eps.append((1 - ap - s**2).clamp(min=0).sqrt())
                c_x.append(torch.tensor(0.0, dtype=torch.float64))
            level, level_next = float((1 - at).clamp(min=0).sqrt()), float((1 - ap).clamp(min=0).sqrt())
            if std[-1] > 0 and level_next < LOW_NOISE and level_next < JUMP_FACTOR * level:
                # a jump into low noise (class docstring): DDIM's eta = 0 step, which keeps the marginals
                std[-1] = torch.tensor(0.0, dtype=torch.float64)
                c_x0[-1], c_eps[-1], c_x[-1] = ap.sqrt(), (1 - ap).sqrt(), torch.tensor(0.0, dtype=torch.float64)
            a_t.append(at)
            a_prev.append(ap)
        self.is_ddpm = is_ddpm
        self.alpha_bar = torch.stack(a_t)
        self.alpha_bar_prev = torch.stack(a_prev)
        self.std = torch.stack(std)
        self._c_x0 = torch.stack(c_x0)
        self._c_eps = torch.stack(c_eps)
        self._c_x = torch.stack(c_x)

    def predict_x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor, k: int):
        """Predicted clean sample and noise at step ``k``, with the scheduler's clipping rule.

        Returns ``(pred_x0, pred_eps)``; ``pred_eps`` is the *unclipped* noise estimate, as diffusers uses in
        the DDIM direction term (``use_clipped_model_output=False``).
        """
        cfg = self.scheduler.config
        at = self.alpha_bar[k].item()
        sa, sb = at**0.5, (1 - at) ** 0.5
        if cfg.prediction_type == "epsilon":
            x0 = (sample - sb * model_output) / sa
            eps = model_output
        elif cfg.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sa * x0) / sb
        else:  # v_prediction
            x0 = sa * sample - sb * model_output
            eps = sa * model_output + sb * sample
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0, eps

    def mean(self, model_output: torch.Tensor, sample: torch.Tensor, k: int) -> torch.Tensor:
        """Transition mean ``mu_k`` (same shape as ``sample``); differentiable in both arguments. DDPM:
        ``c_x0 x0 + c_x x`` (the posterior mean); DDIM, and a DDPM chain's jumps into low noise: ``c_x0 x0 +
        c_eps eps``."""
        x0, eps = self.predict_x0_eps(model_output, sample, k)
        if self.is_ddpm and float(self._c_eps[k]) == 0.0:
            return self._c_x0[k].item() * x0 + self._c_x[k].item() * sample
        return self._c_x0[k].item() * x0 + self._c_eps[k].item() * eps


def check_controllable(schedule: GaussianTransitions, flag: str = "--num_inference_steps") -> None:
    """Raises ``ValueError`` naming ``flag`` when ``schedule`` has no random step: every step is deterministic (one
    step, or two on a flow grid that ends at a floor level), so no control can be applied or trained and no KL
    exists. ``docs/algorithms.md`` §11."""
    if schedule.random_steps():
        return
    K = len(schedule)
    levels = getattr(schedule, "levels", None)
    grid = ""
    if levels is not None:
        grid = " (noise levels " + " -> ".join(f"{float(v):.4g}" for v in [*levels.tolist(), 0.0]) + ")"
    why = "the last step is deterministic" + (", and so is the step into the grid's floor level" if grid else "")
    raise ValueError(f"{flag} {K}: no step of this {K}-step schedule{grid} is random ({why}), so there is nothing "
                     f"to control and no KL; use {flag} 3 or more (10 or more for a useful control)")


# keys of a variance-preserving scheduler config that define the noise schedule and the timestep grid
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one",
                  "rescale_betas_zero_snr")


def as_stochastic_scheduler(scheduler) -> DDPMScheduler | DDIMScheduler:
    """A new ``DDPMScheduler`` / ``DDIMScheduler`` for the stochastic sampler; ``scheduler`` is never modified.

    * DDPM / DDIM: a fresh copy with the same config (``DiffusionSchedule`` calls ``set_timesteps``, which
      must not change the user's object).
    * Other schedulers of a variance-preserving noise schedule (e.g. the ``PNDMScheduler`` Stable Diffusion
      1.x ships with, Euler, DPM-Solver): a ``DDIMScheduler`` with the *same* noise schedule and timestep grid
      (the keys in ``_SCHEDULE_KEYS``), ``clip_sample=False`` and ``thresholding=False`` set explicitly
      (``DDIMScheduler.from_config`` would otherwise fill ``clip_sample=True`` and clamp latents to +-1). One
      log line says what was inherited and what took DDIM's default.
    * Flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``) and anything without a beta schedule are
      refused: their noise schedule is not variance preserving and converting them would train a different
      process.
    """
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    if "FlowMatch" in name or config is None or "beta_schedule" not in config:
        raise ValueError(
            f"{name} is not supported by the DDPM/DDIM stochastic sampler: ELEGANT here needs a variance-"
            "preserving noise schedule (DDPMScheduler, DDIMScheduler, or a scheduler with the same beta schedule "
            "such as PNDMScheduler / EulerDiscreteScheduler, converted to DDIM). Flow-matching schedulers "
            "(SD3, FLUX) are not supported yet."
        )
    if isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        return type(scheduler).from_config(scheduler.config)
    inherited = {k: config[k] for k in _SCHEDULE_KEYS if k in config}
    defaulted = [k for k in _SCHEDULE_KEYS if k not in config]
    converted = DDIMScheduler.from_config(inherited, clip_sample=False, thresholding=False)
    logger.info("converted %s to DDIMScheduler for stochastic sampling: inherited %s; DDIM defaults for %s; "
                "clip_sample=False, thresholding=False", name, inherited, defaulted or "nothing")
    return converted
