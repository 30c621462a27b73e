"""Is the optimum of ELEGANT's drift family reachable? Fit the control to *exact* tilted paths and measure its gap.

ELEGANT's drift only shifts the mean of each Gaussian step of the sampler, so at a finite number of steps even the
best control has a gap to the tilted path law (the "family floor"). This measures a point inside that family
without the drift optimiser: pretrained rollouts are accepted with probability ``exp(r(x_0) / alpha)`` (exact
rejection sampling of the tilted path law ``P_pre exp(r / alpha) / Z`` when ``r <= 0``, as digits' ``log p(3 |
x)``), and the LoRA control is fitted by maximum likelihood to the accepted paths' transitions,
``sum_k |x_{k+1} - mu_theta(x_k, k)|^2 / (2 sigma_k^2)`` -- the forward-KL projection of the tilted path law onto
the family (on the same adapter, start law and sampler). Its ``J`` is a *lower* bound on what the family reaches
(the reverse-KL optimum ``J`` measures is at least as good), so a gap below the drift optimiser's says the optimiser,
not the family, leaves the rest.

Used by ``benchmarks/elegant_objective.py --tilted_fit N`` (the fit replaces the drift's zero start; its ``J``
is printed as iteration 0, and the drift iterations go on from it).
"""

from __future__ import annotations

import math

import torch

from hf_control_ft.core.control import lora_parameters


@torch.no_grad()
def tilted_paths(trainer, reward_fn, rollouts: int, generator: torch.Generator, batch: int = 512) -> dict:
    """Stochastic transitions of the accepted (exactly tilted) pretrained paths: ``{k: (x_k, x_{k+1})}`` and the
    acceptance rate (``Z``)."""
    alpha = trainer.config.alpha
    sched = trainer.sampler.schedule
    steps = [k for k in range(len(sched)) if sched.is_stochastic(k)]
    kept = {k: ([], []) for k in steps}
    accepted = 0
    for start in range(0, rollouts, batch):
        b = min(batch, rollouts - start)
        trainer.process.prepare_batch(b, generator)
        x_T = torch.randn((b, *trainer.sample_shape), generator=generator)
        traj = trainer.sampler.rollout(x_T, generator, controlled=False)
        r = reward_fn(traj.samples).double()
        if (r > 1e-9).any():
            raise ValueError("exact rejection needs r <= 0 (a log-probability reward, as digits')")
        keep = torch.rand(b, generator=generator, dtype=torch.float64) < torch.exp(r / alpha)
        accepted += int(keep.sum())
        for k in steps:
            kept[k][0].append(traj.states[k][keep])
            kept[k][1].append(traj.states[k + 1][keep])
    return {"transitions": {k: (torch.cat(a), torch.cat(b)) for k, (a, b) in kept.items()},
            "acceptance": accepted / rollouts, "paths": accepted}


def fit_control(trainer, paths: dict, iterations: int, batch: int, lr: float, generator: torch.Generator,
                held_out: float = 0.1) -> dict:
    """Maximum-likelihood fit of the LoRA control to the tilted transitions (Adam, ``iterations`` steps of
    ``batch`` paths x every stochastic step); returns the train / held-out negative log-likelihood per path (nats,
    constants dropped) before and after."""
    sched = trainer.sampler.schedule
    trans = paths["transitions"]
    n = paths["paths"]
    perm = torch.randperm(n, generator=generator)
    n_hold = max(1, int(held_out * n))
    hold, train = perm[:n_hold], perm[n_hold:]
    params = [p for p in lora_parameters(trainer.model) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)

    def nll(idx, grad: bool) -> torch.Tensor:
        total = 0.0
        for k, (x, y) in trans.items():
            with torch.set_grad_enabled(grad):
                mu = trainer.sampler.mean(x[idx], k)
                total = total + ((y[idx] - mu) ** 2).flatten(1).sum(1) / (2 * float(sched.std[k]) ** 2)
        return total.mean()

    with torch.no_grad():
        before = (float(nll(train[:2048], False)), float(nll(hold, False)))
    for _ in range(iterations):
        idx = train[torch.randint(len(train), (batch,), generator=generator)]
        opt.zero_grad(set_to_none=True)
        loss = nll(idx, True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (float(nll(train[:2048], False)), float(nll(hold, False)))
    return {"nll_train_before": round(before[0], 4), "nll_held_before": round(before[1], 4),
            "nll_train_after": round(after[0], 4), "nll_held_after": round(after[1], 4),
            "acceptance": round(paths["acceptance"], 4), "paths": n, "log_Z": round(math.log(paths["acceptance"]), 4)}
