"""The controlled sampler: runs the fine-tuned chain and accounts the per-step KL to the pretrained chain.

For stochastic steps (``sigma_k > 0``)

    x_{k+1} = mu_ft(x_k) + sigma_k * eps_k,     KL_k = ||mu_ft(x_k) - mu_pre(x_k)||^2 / (2 sigma_k^2)

with ``mu_ft`` the mean under the LoRA-enabled network and ``mu_pre`` under the same network with adapters
disabled. Deterministic steps (``sigma_k = 0``, e.g. diffusers' last DDPM step) would have infinite KL under
any control, so they run the pretrained network and contribute no KL.

Two ways to get gradients, with identical results (``tests/test_sampler.py`` checks it):

* :meth:`ControlledSampler.differentiable_sample` returns ``(x_0, kl)`` as ordinary autograd tensors (each
  step is checkpointed) for users composing their own loss;
* :meth:`ControlledSampler.rollout` + :meth:`ControlledSampler.backpropagate` is what the trainers use: the
  rollout runs only the fine-tuned network without autograd and stores the states ``x_k``; the backward
  sweep recomputes one step at a time with autograd (fine-tuned *and* pretrained forward), pushes the
  adjoint ``dL/dx_{k+1}`` through it and accumulates LoRA gradients. Per step this costs one fine-tuned
  forward more than plain reward backprop plus one pretrained forward and input-gradient backward -- the
  minimum the exact KL gradient needs -- and memory is one step's activations plus the ``K+1`` states.

**Reference adapter (SEIKO).** With ``reference_adapter="previous"`` (a second, frozen LoRA adapter on the same
network, e.g. the previous round's control) every stochastic step also measures

    KLref_k = ||mu_ft(x_k) - mu_ref(x_k)||^2 / (2 sigma_k^2),

``mu_ref`` being the mean with the reference adapter active. ``rollout`` fills ``Trajectory.ref_kl_steps`` and
``backpropagate(..., reference_kl_weight=w)`` adds ``sum_b w_b sum_k KLref_k`` to the loss, with the gradient
flowing through ``x_k`` into all three means (never into the frozen reference adapter). Without a reference
adapter nothing changes.

**Precision of the KL.** ``KL_k`` is the squared difference of two network outputs. Under half-precision
autocast each output carries rounding noise of relative size 2^-8 (bf16) or 2^-11 (fp16), and their difference
has a noise floor that can exceed the true KL of a small control by orders of magnitude
(``benchmarks/kl_precision.py``). ``kl_context`` (a callable returning a context manager, e.g.
:meth:`hf_control_ft.processes.stable_diffusion.GuidedUNet.full_precision`) wraps every network call that feeds a KL:
the fine-tuned, pretrained and reference means of :meth:`step_with_kl` / :meth:`step_with_kls` (and of the
adjoint-matching regression). Plain sampling steps without a KL run as the model is configured.

Truncation (``truncate_backprop_steps=N``) backpropagates through the last ``N`` steps only. It is an
approximation (DRaFT-K style): earlier steps get no gradient; their KL is still measured and reported.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .control import CONTROL_ADAPTER, call_denoiser, pretrained_mode, reference_adapter_mode
from .difference import difference_parts
from .difference_lora import difference_mode
from .kl import difference_kl
from .scheduling import DiffusionSchedule


@dataclass
class Trajectory:
    """A rollout of the fine-tuned chain.

    Attributes:
        states: ``K + 1`` detached tensors ``(B, *shape)``: ``states[0]`` is the initial noise ``x_T``,
            ``states[K]`` the final sample.
        noises: ``K`` tensors (or ``None`` for deterministic steps) used at each step.
        kl_steps: ``(K, B)`` per-step KL; filled by :meth:`ControlledSampler.backpropagate` for the steps
            it recomputes and by the rollout for the others (``measure_kl=True``).
        ref_kl_steps: ``(K, B)`` per-step KL to the reference adapter (filled like ``kl_steps``), or ``None``
            when the sampler has no reference adapter.
    """

    states: list
    noises: list
    kl_steps: torch.Tensor
    ref_kl_steps: torch.Tensor | None = None

    @property
    def samples(self) -> torch.Tensor:
        return self.states[-1]

    @property
    def kl(self) -> torch.Tensor:
        """``(B,)`` path KL of the drift (sum over steps), nats."""
        return self.kl_steps.sum(dim=0)

    @property
    def ref_kl(self) -> torch.Tensor | None:
        """``(B,)`` path KL to the reference adapter's chain, nats (``None`` without a reference adapter)."""
        return None if self.ref_kl_steps is None else self.ref_kl_steps.sum(dim=0)


class ControlledSampler:
    """Fine-tuned reverse chain of a LoRA-controlled denoiser on a :class:`DiffusionSchedule`.

    Args:
        model: denoiser with a LoRA adapter (see :func:`hf_control_ft.core.control.add_lora_control`).
        schedule: transitions of the scheduler.
        gradient_checkpointing: checkpoint each step in :meth:`differentiable_sample`.
        truncate_backprop_steps: backpropagate through the last N steps only (approximation; None = all).
        model_kwargs: extra keyword arguments for every denoiser call (e.g. ``encoder_hidden_states``).
        reference_adapter: name of a frozen adapter on ``model`` whose chain is the reference of a second
            per-step KL term (SEIKO's previous round); ``None`` (default) for the plain ELEGANT sampler.
        kl_context: callable returning a context manager entered around every network call that feeds a KL
            (see the module docstring); ``None``: no change.
        difference: compute each KL's mean difference by difference propagation (one pass carrying the pretrained
            values and the fine-tuned network's difference from them, :mod:`hf_control_ft.core.difference`;
            ``kl_precision="delta"``) instead of subtracting two passes.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: DiffusionSchedule,
        gradient_checkpointing: bool = True,
        truncate_backprop_steps: int | None = None,
        model_kwargs: dict | None = None,
        reference_adapter: str | None = None,
        kl_context=None,
        difference: bool = False,
    ):
        self.model = model
        self.schedule = schedule
        self.gradient_checkpointing = gradient_checkpointing
        if truncate_backprop_steps is not None and truncate_backprop_steps < 1:
            raise ValueError(f"truncate_backprop_steps must be >= 1 or None, got {truncate_backprop_steps}")
        self.truncate_backprop_steps = truncate_backprop_steps
        self.model_kwargs = model_kwargs if model_kwargs is not None else {}  # shared: the process may update it
        self.reference_adapter = reference_adapter
        self.kl_context = kl_context or contextlib.nullcontext
        self.difference = bool(difference)

    # ------------------------------------------------------------------ single steps
    def predict(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Network prediction at step ``k`` under the model's current adapter state."""
        t = self.schedule.timestep(k).to(x.device).expand(x.shape[0])
        return call_denoiser(self.model, x, t, **self.model_kwargs)

    def mean(self, x: torch.Tensor, k: int, controlled: bool = True) -> torch.Tensor:
        """Transition mean at step ``k``: fine-tuned (``controlled=True``) or pretrained."""
        if controlled and self.schedule.is_stochastic(k):
            return self.schedule.mean(self.predict(x, k), x, k)
        with pretrained_mode(self.model):
            return self.schedule.mean(self.predict(x, k), x, k)

    def reference_mean(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Transition mean at step ``k`` under the frozen reference adapter (pretrained at deterministic steps,
        like every chain here)."""
        if self.reference_adapter is None:
            raise ValueError("this sampler has no reference_adapter")
        if not self.schedule.is_stochastic(k):
            return self.mean(x, k, controlled=False)
        with reference_adapter_mode(self.model, self.reference_adapter):
            return self.schedule.mean(self.predict(x, k), x, k)

    def _chain_mean(self, x: torch.Tensor, k: int, chain: str) -> torch.Tensor:
        if chain == "reference":
            return self.reference_mean(x, k)
        return self.mean(x, k, controlled=chain == "control")

    def means(self, x: torch.Tensor, k: int, target: str = "control", base: str = "pretrained"):
        """``(mu_target, mu_base, mu_target - mu_base)`` at stochastic step ``k``, inside ``kl_context``; chains
        ``"control"`` (fine-tuned), ``"pretrained"`` or ``"reference"`` (the frozen reference adapter). With
        ``difference`` the difference comes from one difference-propagation pass (exact at the pass's precision
        relative to the difference itself) and ``mu_target`` is ``mu_base`` plus it."""
        with self.kl_context():
            if not self.difference:
                mu_t, mu_b = self._chain_mean(x, k, target), self._chain_mean(x, k, base)
                return mu_t, mu_b, mu_t - mu_b
            names = {"control": (CONTROL_ADAPTER,), "pretrained": (), "reference": (self.reference_adapter,)}
            with difference_mode(self.model, target=names[target], base=names[base]):
                mu = self.schedule.mean(self.predict(x, k), x, k)
        mu_b, u = difference_parts(mu)
        u = torch.zeros_like(mu_b) if u is None else u.to(mu_b.dtype)
        return mu_b + u, mu_b, u

    def step_with_kls(self, x: torch.Tensor, k: int, noise: torch.Tensor | None):
        """``(x_{k+1}, KL_k, KLref_k)``: the step, its KL to the pretrained chain and to the reference chain."""
        if not self.schedule.is_stochastic(k):
            zeros = x.new_zeros(x.shape[0])
            return self.mean(x, k, controlled=False), zeros, zeros
        mu_ft, _, u = self.means(x, k)
        u_ref = self.means(x, k, base="reference")[2]
        std = self.schedule.std[k]
        x_next = self.schedule.step_from_mean(mu_ft, k, noise)
        return x_next, difference_kl(u, std), difference_kl(u_ref, std)

    def step_with_kl(self, x: torch.Tensor, k: int, noise: torch.Tensor | None):
        """``(x_{k+1}, KL_k)`` for one step; ``KL_k`` is ``(B,)`` (zeros for deterministic steps)."""
        if not self.schedule.is_stochastic(k):
            return self.mean(x, k, controlled=False), x.new_zeros(x.shape[0])
        mu_ft, _, u = self.means(x, k)
        return self.schedule.step_from_mean(mu_ft, k, noise), difference_kl(u, self.schedule.std[k])

    @torch.no_grad()
    def trajectory_kl(self, trajectory: "Trajectory", context=None, reference: bool = False):
        """``(B,)`` path KL of the stored transitions of ``trajectory``, recomputed with every network call inside
        ``context()`` (e.g. a process's exact-arithmetic context, when the passes that trained were half
        precision): the KL of the chain that drew those samples, without a new rollout. ``reference=True`` (a
        sampler with a reference adapter): ``(KL, KL to the reference chain)``."""
        context = context or contextlib.nullcontext
        kl = trajectory.states[0].new_zeros(trajectory.states[0].shape[0])
        ref = torch.zeros_like(kl)
        for k in range(len(self.schedule)):
            if self.schedule.is_stochastic(k):
                with context():
                    if reference:
                        _, kl_k, ref_k = self.step_with_kls(trajectory.states[k], k, trajectory.noises[k])
                        ref = ref + ref_k
                    else:
                        kl_k = self.step_with_kl(trajectory.states[k], k, trajectory.noises[k])[1]
                kl = kl + kl_k
        return (kl, ref) if reference else kl

    def _noise(self, like: torch.Tensor, k: int, generator) -> torch.Tensor | None:
        if not self.schedule.is_stochastic(k):
            return None
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)

    def _first_grad_step(self) -> int:
        K = len(self.schedule)
        n = self.truncate_backprop_steps
        return 0 if n is None else max(0, K - n)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def rollout(self, x_T: torch.Tensor, generator: torch.Generator | None = None, controlled: bool = True,
                measure_kl: bool = False) -> Trajectory:
        """Runs the chain from ``x_T`` without autograd, storing every state.

        Args:
            controlled: fine-tuned chain (True) or pretrained chain (False).
            measure_kl: also compute the KL of every step (one extra pretrained forward per step). When False,
                only the steps outside the backprop window are measured (the backward sweep fills the rest).
        """
        K = len(self.schedule)
        first = self._first_grad_step()
        states, noises = [x_T.detach()], []
        kl_steps = x_T.new_zeros(K, x_T.shape[0])
        with_ref = controlled and self.reference_adapter is not None
        ref_kl_steps = x_T.new_zeros(K, x_T.shape[0]) if with_ref else None
        x = x_T.detach()
        for k in range(K):
            noise = self._noise(x, k, generator)
            if with_ref and (measure_kl or k < first):
                x, kl_steps[k], ref_kl_steps[k] = self.step_with_kls(x, k, noise)
            elif controlled and (measure_kl or k < first):
                x, kl_steps[k] = self.step_with_kl(x, k, noise)
            else:
                mu = self.mean(x, k, controlled=controlled)
                x = self.schedule.step_from_mean(mu, k, noise)
            states.append(x)
            noises.append(noise)
        return Trajectory(states=states, noises=noises, kl_steps=kl_steps, ref_kl_steps=ref_kl_steps)

    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, generator: torch.Generator | None = None, controlled: bool = True):
        """Final samples ``(B, *shape)`` of the (fine-tuned or pretrained) chain from ``x_T``."""
        x = x_T
        for k in range(len(self.schedule)):
            noise = self._noise(x, k, generator)
            x = self.schedule.step_from_mean(self.mean(x, k, controlled=controlled), k, noise)
        return x

    def differentiable_sample(self, x_T: torch.Tensor, generator: torch.Generator | None = None,
                              return_reference_kl: bool = False):
        """Samples with autograd through the chain (and into ``x_T``).

        Returns:
            ``(x_0, kl)``: final samples ``(B, *shape)`` and the path KL of the drift ``(B,)``, both
            differentiable with respect to the LoRA parameters and ``x_T``. Each step is checkpointed when
            ``gradient_checkpointing`` is set; steps before the truncation window run without gradients.
            With ``return_reference_kl=True`` (needs a reference adapter): ``(x_0, kl, ref_kl)``.
        """
        if return_reference_kl and self.reference_adapter is None:
            raise ValueError("return_reference_kl=True needs a sampler built with reference_adapter")
        step = self.step_with_kls if return_reference_kl else self.step_with_kl
        first = self._first_grad_step()
        x, kl = x_T, x_T.new_zeros(x_T.shape[0])
        ref_kl = x_T.new_zeros(x_T.shape[0])
        for k in range(len(self.schedule)):
            noise = self._noise(x, k, generator)
            if k < first:
                with torch.no_grad():
                    out = step(x.detach(), k, noise)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                out = checkpoint(step, x, k, noise, use_reentrant=False)
            else:
                out = step(x, k, noise)
            x, kl = out[0], kl + out[1]
            if return_reference_kl:
                ref_kl = ref_kl + out[2]
        return (x, kl, ref_kl) if return_reference_kl else (x, kl)

    def _step_scales(self, power: float) -> list[float]:
        """``c_k = (sigma_k^2 / mean sigma^2)^power`` at stochastic steps, 1 at deterministic ones."""
        K = len(self.schedule)
        if not power:
            return [1.0] * K
        var = {k: float(self.schedule.std[k]) ** 2 for k in range(K) if self.schedule.is_stochastic(k)}
        mean = sum(var.values()) / max(len(var), 1)
        return [(var[k] / mean) ** power if k in var else 1.0 for k in range(K)]

    def backpropagate(self, trajectory: Trajectory, grad_samples: torch.Tensor,
                      kl_weight: float | torch.Tensor | None,
                      reference_kl_weight: float | torch.Tensor | None = None,
                      step_weight_power: float = 0.0) -> torch.Tensor:
        """Backward sweep: accumulates into the LoRA parameters' ``.grad`` the gradient of

            L = sum_b <grad_samples_b, x_0_b> + sum_b kl_weight_b * sum_k KL_k_b

        (e.g. ``grad_samples = -dr/dx_0 / B`` and ``kl_weight = alpha / B`` for the loss
        ``mean(-r + alpha * KL)``), fills ``trajectory.kl_steps`` for the recomputed steps and returns
        ``dL/dx_T`` ``(B, *shape)`` so the initial-noise model can continue the chain rule.

        ``kl_weight=None`` drops the KL entirely (plain reward backpropagation, the AlignProp/DRaFT regime):
        only the fine-tuned network is recomputed and ``kl_steps`` stay as the rollout left them.

        ``reference_kl_weight`` (needs a reference adapter and a ``kl_weight``) adds
        ``sum_b reference_kl_weight_b * sum_k KLref_k`` (SEIKO: ``beta / B``) and fills ``ref_kl_steps``.

        ``step_weight_power = p != 0`` multiplies the *parameter* gradient that step ``k``'s network call receives
        by ``c_k = (sigma_k^2 / mean_j sigma_j^2)^p`` and leaves the chain's adjoint exact (the step's
        vector-Jacobian product is taken with ``c_k`` times the cotangents and its input gradient divided by
        ``c_k``): a per-step preconditioner, ``sigma_k^2`` being the inverse of step ``k``'s KL metric. It keeps
        every stationary point where each step's control is at its own optimum (``docs/algorithms.md`` §7).
        """
        K = len(self.schedule)
        first = self._first_grad_step()
        B = grad_samples.shape[0]
        with_kl = kl_weight is not None
        with_ref = reference_kl_weight is not None
        if with_ref and (not with_kl or self.reference_adapter is None or trajectory.ref_kl_steps is None):
            raise ValueError("reference_kl_weight needs a kl_weight, a sampler with reference_adapter and a "
                             "trajectory rolled out by it")
        if with_kl:
            w = torch.as_tensor(kl_weight, dtype=grad_samples.dtype, device=grad_samples.device).expand(B)
        if with_ref:
            w_ref = torch.as_tensor(reference_kl_weight, dtype=grad_samples.dtype, device=grad_samples.device).expand(B)
        adjoint = grad_samples.detach()
        scales = self._step_scales(step_weight_power)
        for k in reversed(range(first, K)):
            c = scales[k]
            x_k = trajectory.states[k].detach().requires_grad_(True)
            with torch.enable_grad():
                ref_k = None
                if with_ref:
                    x_next, kl_k, ref_k = self.step_with_kls(x_k, k, trajectory.noises[k])
                elif with_kl:
                    x_next, kl_k = self.step_with_kl(x_k, k, trajectory.noises[k])
                else:
                    x_next = self.schedule.step_from_mean(self.mean(x_k, k), k, trajectory.noises[k])
                    kl_k = None
                outputs, grads = [x_next], [adjoint]
                if kl_k is not None and kl_k.requires_grad:
                    outputs.append(kl_k)
                    grads.append(w)
                if ref_k is not None and ref_k.requires_grad:
                    outputs.append(ref_k)
                    grads.append(w_ref)
                torch.autograd.backward(outputs, grads if c == 1.0 else [g * c for g in grads])
            if kl_k is not None:
                trajectory.kl_steps[k] = kl_k.detach()
            if ref_k is not None:
                trajectory.ref_kl_steps[k] = ref_k.detach()
            adjoint = x_k.grad if c == 1.0 else x_k.grad / c
        if first > 0:
            return torch.zeros_like(adjoint)
        return adjoint
