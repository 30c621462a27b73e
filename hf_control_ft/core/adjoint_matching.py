"""Adjoint matching for the drift stage: a regression on detached targets instead of reward backprop.

Domingo-Enrich et al., "Adjoint Matching" (arXiv 2409.08861), in the discrete time of a diffusers sampler
(``docs/algorithms.md`` §1-2 notation: step ``k = 0 .. K-1`` maps ``x_k`` to ``x_{k+1}``, ``x_K`` is the sample).

**Lean adjoint.** Along a rollout ``x_0 .. x_K`` of the *current* fine-tuned chain (no autograd),

    a_K = grad r(x_K),        a_k = (d mu_pre(x_k) / d x_k)^T a_{k+1},

i.e. the reward gradient pulled back through the *pretrained* means only (vector-Jacobian products of the
frozen network). With zero control this is exactly ``d r(x_K) / d x_k`` through the chain at fixed noises.

**Regression.** The control ``u_k = mu_ft(x_k) - mu_pre(x_k)`` of every stochastic step is regressed onto

    target_k = sigma_k^2 * a_{k+1} / alpha,     loss = mean_b sum_k ||u_k - target_k||^2 / (2 sigma_k^2),

(the per-step weight ``1 / (2 sigma_k^2)`` puts the loss in KL units, like the objective's KL term;
``step_weight_power`` reweights the steps for the gradient, ``ElegantConfig.regression_weight_power``). Targets
are detached: the gradient reaches the LoRA parameters only through ``mu_ft``.

**Why the fixed point is the ELEGANT optimum.** Let ``V_k(x) = alpha log E_pre[exp(r(x_K)/alpha) | x_k = x]``
and ``Q*`` the tilted path law (pretrained paths reweighted by ``exp(r/alpha)``). Reparameterising the
pretrained chain at fixed noises, ``grad V_k(x) = E_{Q*}[a_k | x_k = x]`` exactly (the pathwise derivative of
``r`` through ``mu_pre`` is ``a_k``). The optimal transition ``q*(x_{k+1} | x_k) ∝ p_pre(x_{k+1} | x_k)
exp(V_{k+1}(x_{k+1}) / alpha)`` has mean ``mu_pre(x_k) + sigma_k^2 E_{q*}[grad V_{k+1}(x_{k+1})] / alpha``
(Gaussian integration by parts), which is the regression's solution ``mu_pre + E[target_k | x_k]`` when the
chain is ``Q*``. So the optimal Gaussian-mean control is a fixed point of this regression, up to the
discrete-time restriction of transitions to Gaussians with the pretrained variance (which vanishes as steps
shrink). The start law is not touched here: with ``x_0 ~ nu*`` (the learned initial noise, stage 2) the
fixed point samples ``p_pre(x) exp(r(x)/alpha) / Z``; with ``x_0 ~ N(0, I)`` it samples the fixed-noise
(biased, ``docs/algorithms.md`` §3) law.

Deterministic steps (``sigma_k = 0``, e.g. DDIM's last step with ``set_alpha_to_one``) carry no control; the
adjoint passes through them with the pretrained Jacobian, as the chain itself runs the pretrained network.

Cost per step: one fine-tuned forward + parameter backward and one pretrained forward + input backward, the
same as the exact pathwise gradient of :meth:`ControlledSampler.backpropagate`; memory is one step's
activations plus the stored states.

**Timestep subsampling.** The loss is a sum of per-step terms whose targets are detached, so training the terms of
a random subset ``S`` of the ``n`` stochastic steps, each weighted ``n / |S|``, is an unbiased estimate of the full
gradient (DDPO's and Flow-GRPO's ``timestep_fraction``, here without bias: the targets do not depend on which steps
are trained). The lean adjoint still needs the pretrained VJP at every step; with ``value_gradient`` the steps
outside ``S`` cost nothing. The per-step KL of the steps outside ``S`` is then not measured: those of ``S`` are
weighted ``n / |S|`` too, an unbiased estimate of the path KL.

**Variance.** The single-path adjoint ``a_{k+1}`` is heavy-tailed when modes are far apart: most paths
contract inside a mode, and the few that pass near a boundary between modes carry large Jacobian products
(``docs/algorithms.md`` §8). Passing ``value_gradient`` (a fitted ``grad V_{k+1}``,
:mod:`hf_control_ft.models.step_values`) replaces the target by its conditional expectation: same fixed point, low
variance, biased only by the value fit (``ElegantConfig.drift_objective="value_guided"``).
"""

from __future__ import annotations

import torch

from .sampler import ControlledSampler, Trajectory


def _sum_non_batch(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def _trainable(model: torch.nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def lean_adjoints(sampler: ControlledSampler, trajectory: Trajectory, grad_samples: torch.Tensor) -> list:
    """The lean adjoints ``[a_0, ..., a_K]`` of a rollout (each ``(B, *shape)``, detached).

    Args:
        sampler: the sampler that produced ``trajectory``.
        trajectory: a rollout (``states[k]`` is ``x_k``).
        grad_samples: ``a_K``, e.g. ``grad r(x_K)`` ``(B, *shape)``.
    """
    K = len(sampler.schedule)
    adjoints = [None] * (K + 1)
    adjoints[K] = grad_samples.detach()
    for k in reversed(range(K)):
        x_k = trajectory.states[k].detach().requires_grad_(True)
        with torch.enable_grad():
            mu_pre = sampler.mean(x_k, k, controlled=False)
            (a_k,) = torch.autograd.grad(mu_pre, x_k, adjoints[k + 1])
        adjoints[k] = a_k.detach()
    return adjoints


def adjoint_matching_backward(sampler: ControlledSampler, trajectory: Trajectory, grad_samples: torch.Tensor,
                              alpha: float, loss_scale: float = 1.0, value_gradient=None,
                              step_weight_power: float = 0.0, train_steps=None) -> torch.Tensor:
    """One backward sweep of adjoint matching; accumulates LoRA gradients into ``.grad``.

    Walks the steps from last to first, carrying the lean adjoint ``a_{k+1}``. At each stochastic step it
    evaluates ``u_k = mu_ft(x_k) - mu_pre(x_k)``, backpropagates ``loss_scale * sum_b ||u_k - sigma_k^2
    a_{k+1} / alpha||^2 / (2 sigma_k^2)`` into the LoRA parameters (through ``mu_ft`` only), records the exact
    per-step KL ``||u_k||^2 / (2 sigma_k^2)`` in ``trajectory.kl_steps[k]`` and pulls the adjoint back through
    the pretrained mean.

    Args:
        sampler: the sampler that produced ``trajectory`` (fine-tuned rollout).
        trajectory: rollout of the current fine-tuned chain; its ``kl_steps`` are overwritten.
        grad_samples: ``grad r(x_K)`` per sample, ``(B, *shape)``.
        alpha: KL weight of the objective (> 0).
        loss_scale: multiplies the loss before backward (``1 / B`` gives the batch mean).
        value_gradient: optional ``(x, k) -> grad V_k(x)`` (e.g. :meth:`StepValueFunction.gradient
            <hf_control_ft.models.step_values.StepValueFunction.gradient>`). When given, the target of step ``k`` uses
            ``grad V_{k+1}(x_{k+1})`` instead of the single-path adjoint ``a_{k+1}`` (``a_K = grad r`` stays
            exact): the conditional expectation of ``a_{k+1}`` under the tilted law, so the same fixed point
            with a low-variance target, at the price of the value fit's error ("value-guided" drift). No
            pretrained input-gradient is then needed.
        step_weight_power: the backpropagated loss of step ``k`` is multiplied by ``(sigma_k^2 / mean_j
            sigma_j^2)^p`` (``p = 0``: the KL-unit loss above; ``p = 1``: plain least squares on the means, which
            weighs the high-noise steps more). Every ``p`` has the same minimiser for an adapter that can represent
            every step's target; with a finite adapter it decides which steps the fit favours.
        train_steps: the stochastic steps whose terms are trained (see *timestep subsampling*), each weighted
            ``n / len(train_steps)``; ``None``: all of them, weight 1.

    Returns:
        ``(B,)`` regression loss per sample (detached, in nats), summed over steps.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    schedule = sampler.schedule
    K = len(schedule)
    B = grad_samples.shape[0]
    adjoint = grad_samples.detach()
    total = grad_samples.new_zeros(B)
    variances = [float(schedule.std[k]) ** 2 for k in range(K) if schedule.is_stochastic(k)]
    mean_var = sum(variances) / max(len(variances), 1)
    trained = set(range(K)) if train_steps is None else {int(k) for k in train_steps}
    inflation = len(variances) / max(1, len(trained)) if train_steps is not None else 1.0
    for k in reversed(range(K)):
        step_trained = schedule.is_stochastic(k) and k in trained
        if not step_trained:
            if schedule.is_stochastic(k):
                trajectory.kl_steps[k] = 0.0  # not measured: the trained steps' KL, weighted, estimates the path's
            if value_gradient is not None:
                continue  # nothing to regress, and the fitted values need no adjoint pulled through this step
        if value_gradient is not None and k + 1 < K:
            adjoint = value_gradient(trajectory.states[k + 1], k + 1).detach()
        x_k = trajectory.states[k].detach()
        x_in = x_k.clone().requires_grad_(value_gradient is None)
        one_pass = step_trained and sampler.difference  # one difference-propagation pass gives mu_pre and u
        # ... and u then depends on x_in too: the adjoint takes mu_pre's input gradient only, the loss the LoRA's
        split_backward = one_pass and value_gradient is None
        with torch.enable_grad(), sampler.kl_context():
            if one_pass:
                _, mu_pre, u = sampler.means(x_in, k)
            else:
                mu_pre = sampler.mean(x_in, k, controlled=False)
            outputs, grads = ([mu_pre], [adjoint]) if value_gradient is None else ([], [])
            if split_backward:
                (x_grad,) = torch.autograd.grad(mu_pre, x_in, adjoint, retain_graph=True)
                outputs, grads = [], []
            if step_trained:
                var = float(schedule.std[k]) ** 2
                if not one_pass:
                    mu_ft = sampler.mean(x_k, k, controlled=True)  # x_k without grad: only LoRA params
                    u = mu_ft - mu_pre.detach()
                target = (var / alpha) * adjoint
                loss_k = _sum_non_batch((u - target).pow(2)) / (2.0 * var)
                if loss_k.requires_grad:
                    weight = loss_scale * inflation
                    if step_weight_power:
                        weight = weight * (var / mean_var) ** step_weight_power
                    outputs.append(loss_k.sum())
                    grads.append(torch.as_tensor(weight, dtype=loss_k.dtype, device=loss_k.device))
                trajectory.kl_steps[k] = inflation * _sum_non_batch(u.detach().pow(2)) / (2.0 * var)
                total = total + inflation * loss_k.detach()
            if split_backward:
                if outputs:
                    torch.autograd.backward(outputs, grads, inputs=_trainable(sampler.model))
                adjoint = x_grad.detach()
                continue
            if outputs:
                torch.autograd.backward(outputs, grads)
        if value_gradient is None:
            adjoint = x_in.grad.detach()
    return total
