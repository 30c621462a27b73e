"""Learned initial noise: the law ``nu_phi`` of ``x_T`` as the end point of an auxiliary controlled SDE.

``N(0, I)`` is the law at ``s = 1`` of ``dy = dW, y_0 = 0``. Adding a drift ``g_phi(s, y)`` gives

    y_{j+1} = y_j + g_phi(s_j, y_j) * ds + sqrt(ds) * xi_j,      xi_j ~ N(0, I),  ds = 1 / M,

and ``x_T = y_M ~ nu_phi``. The KL between the discretised path laws with and without drift is exactly
``sum_j ||g_phi(s_j, y_j)||^2 ds / 2`` (each step is a Gaussian with the same covariance ``ds I``), and by the
data-processing inequality it upper-bounds ``KL(nu_phi || N(0, I))``, with equality at the optimum of
``E[v_T(y_M)] - alpha * KL`` (``docs/algorithms.md`` §4). With ``g = 0`` (the zero-initialised network) the model
samples exactly ``N(0, I)`` and reports KL 0.

Memory is that of ``M`` small-network calls on a batch of samples, so it scales to Stable Diffusion latents.

**Conditional start law** (``cond_dim > 0``): the drift also takes a per-sample condition ``c`` (the process's
condition features: a pooled text embedding, a one-hot class), ``g_phi(s, y, c)``, so ``nu_phi(. | c)`` targets
``N(0, I) exp(v_T(x, c) / alpha)`` for every condition at once. For a fixed ``c`` the path KL above is still
exact. A condition never seen in training still gets a valid law (any drift defines one); how close it is to
its optimum depends on how the condition network generalises.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .networks import FieldNetwork


class InitialNoiseModel(nn.Module, PyTorchModelHubMixin, library_name="hf_control_ft",
                        tags=["hf_control_ft", "initial-noise"]):
    """Sampler of ``x_T ~ nu_phi`` with a faithful KL to ``N(0, I)``.

    Args:
        sample_shape: shape of one sample, e.g. ``(2,)`` or ``(4, 64, 64)``.
        num_steps: Euler--Maruyama steps ``M`` of the auxiliary SDE.
        hidden: width of the drift network.
        depth: residual blocks of the drift network.
        cond_dim: width of the per-sample condition (0: unconditional).

    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (safetensors + config).
    """

    def __init__(self, sample_shape=(2,), num_steps: int = 20, hidden: int = 128, depth: int = 3, cond_dim: int = 0):
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.num_steps = int(num_steps)
        self.cond_dim = int(cond_dim)
        self.drift = FieldNetwork(self.sample_shape, out="same", hidden=hidden, depth=depth, cond_dim=cond_dim)

    def forward(self, num_samples: int, generator: torch.Generator | None = None, device=None,
                reference: "InitialNoiseModel | None" = None, condition: torch.Tensor | None = None):
        """Draws ``num_samples`` initial noises (reparameterised: differentiable in ``phi``).

        Args:
            reference: a second initial-noise model with the same ``num_steps`` (e.g. SEIKO's previous round,
                frozen). Along the same path it also measures ``sum_j ||g - g_ref||^2 ds / 2``, the exact KL of
                the discretised path laws of this model and the reference.

            condition: ``(B, cond_dim)`` per-sample conditions (required iff ``cond_dim > 0``).

        Returns:
            ``(x_T, kl)``: ``(B, *sample_shape)`` samples and ``(B,)`` path KL to ``N(0, I)`` in nats; with a
            ``reference``, ``(x_T, kl, kl_ref)``.
        """
        device = device or next(self.parameters()).device
        if reference is not None and reference.num_steps != self.num_steps:
            raise ValueError(f"reference has {reference.num_steps} steps, this model {self.num_steps}")
        ds = 1.0 / self.num_steps
        y = torch.zeros((num_samples, *self.sample_shape), device=device)
        kl = torch.zeros(num_samples, device=device)
        kl_ref = torch.zeros(num_samples, device=device)
        gen_device = generator.device if generator is not None else device
        for j in range(self.num_steps):
            g = self.drift(y, j * ds, condition)
            kl = kl + 0.5 * ds * g.reshape(num_samples, -1).pow(2).sum(dim=1)
            if reference is not None:
                g_ref = reference.drift(y, j * ds, condition)
                kl_ref = kl_ref + 0.5 * ds * (g - g_ref).reshape(num_samples, -1).pow(2).sum(dim=1)
            xi = torch.randn(y.shape, generator=generator, device=gen_device).to(device)
            y = y + g * ds + math.sqrt(ds) * xi
        return (y, kl) if reference is None else (y, kl, kl_ref)

    def sample(self, num_samples: int, generator: torch.Generator | None = None, device=None,
               condition: torch.Tensor | None = None):
        """``x_T`` only, without autograd."""
        with torch.no_grad():
            return self(num_samples, generator=generator, device=device, condition=condition)[0]
