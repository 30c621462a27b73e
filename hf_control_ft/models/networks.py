"""Small time-conditioned networks: the value function, the initial-noise drift and toy denoisers.

``build_field_network(sample_shape, out)`` picks an MLP for flat samples and a small conv net for image-like
samples ``(C, H, W)``; both take ``(x, s)`` with ``x`` of shape ``(B, *sample_shape)`` and ``s`` a time in
``[0, 1]`` (scalar or ``(B,)``), and return ``(B, *sample_shape)`` (``out="same"``) or ``(B,)``
(``out="scalar"``). The last layer is zero-initialised so a new network outputs exactly 0: a zero drift
(initial noise = N(0, I)) and a constant value function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class DenoiserOutput(BaseOutput):
    """``sample``: the noise prediction, shape of the input sample."""

    sample: torch.Tensor


def sinusoidal_embedding(s: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """``(B,)`` times in ``[0, 1]`` -> ``(B, dim)`` sin/cos features (frequencies up to ``max_period``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
    args = (s.float()[:, None] * max_period) * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def _time_batch(s, batch: int, device) -> torch.Tensor:
    s = torch.as_tensor(s, device=device, dtype=torch.float32)
    return s.expand(batch) if s.dim() == 0 else s.reshape(batch)


def _condition_embedding(cond_dim: int, hidden: int) -> nn.Module | None:
    if not cond_dim:
        return None
    return nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


def _add_condition(embedding: nn.Module | None, temb: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    if embedding is None:
        if c is not None:
            raise ValueError("this network was built without a condition (cond_dim=0) but got one")
        return temb
    if c is None:
        raise ValueError("this network is conditional (cond_dim > 0): pass the per-sample condition")
    if c.shape[0] != temb.shape[0]:
        raise ValueError(f"{c.shape[0]} conditions for a batch of {temb.shape[0]}")
    return temb + embedding(c.to(temb.dtype))


class TimeConditionedMLP(nn.Module):
    """Residual MLP ``f(x, s)`` on flat inputs with a sinusoidal time embedding added in every block."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 32,
                 cond_dim: int = 0):
        super().__init__()
        self.time_dim = time_dim
        self.inp = nn.Linear(in_dim, hidden)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, out_dim))
        self.cond = _condition_embedding(cond_dim, hidden)

    def forward(self, x: torch.Tensor, s, c: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        temb = self.time(sinusoidal_embedding(_time_batch(s, b, x.device), self.time_dim).to(x.dtype))
        temb = _add_condition(self.cond, temb, c)
        h = self.inp(x.reshape(b, -1)) + temb
        for block in self.blocks:
            h = h + block(h + temb)
        return self.out(h)


class TimeConditionedConvNet(nn.Module):
    """Small conv net ``f(x, s)`` on ``(B, C, H, W)``; memory linear in ``H*W`` (fits SD latents)."""

    def __init__(self, channels: int, out: str = "same", hidden: int = 64, depth: int = 3, time_dim: int = 32,
                 cond_dim: int = 0):
        super().__init__()
        self.time_dim, self.out_kind = time_dim, out
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.GroupNorm(8 if hidden % 8 == 0 else 1, hidden), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1)
            )
            for _ in range(depth)
        )
        self.out = nn.Conv2d(hidden, channels, 3, padding=1) if out == "same" else nn.Linear(hidden, 1)
        self.cond = _condition_embedding(cond_dim, hidden)

    def forward(self, x: torch.Tensor, s, c: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        temb = self.time(sinusoidal_embedding(_time_batch(s, b, x.device), self.time_dim).to(x.dtype))
        temb = _add_condition(self.cond, temb, c)[:, :, None, None]
        h = self.inp(x) + temb
        for block in self.blocks:
            h = h + block(h + temb)
        if self.out_kind == "same":
            return self.out(h)
        return self.out(h.mean(dim=(2, 3)))


class FieldNetwork(nn.Module):
    """Wraps the MLP or conv net so that both return ``(B, *sample_shape)`` or ``(B,)``."""

    def __init__(self, sample_shape, out: str = "same", hidden: int = 128, depth: int = 3, cond_dim: int = 0):
        super().__init__()
        if out not in ("same", "scalar"):
            raise ValueError(f"out must be 'same' or 'scalar', got {out!r}")
        self.sample_shape, self.out_kind = tuple(sample_shape), out
        self.cond_dim = int(cond_dim)
        numel = math.prod(self.sample_shape)
        self.convolutional = len(self.sample_shape) == 3 and numel > 256
        if self.convolutional:
            self.net = TimeConditionedConvNet(self.sample_shape[0], out, hidden=min(hidden, 64), depth=depth,
                                              cond_dim=cond_dim)
            last = self.net.out
        else:
            self.net = TimeConditionedMLP(numel, numel if out == "same" else 1, hidden=hidden, depth=depth,
                                          cond_dim=cond_dim)
            last = self.net.out[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, s, c: torch.Tensor | None = None) -> torch.Tensor:
        y = self.net(x, s, c)
        if self.out_kind == "scalar":
            return y.reshape(x.shape[0])
        return y.reshape(x.shape)


class MLPDenoiser(ModelMixin, ConfigMixin):
    """A diffusers-style noise-prediction MLP for flat samples: ``model(sample, timestep).sample``.

    ``sample`` is ``(B, dim)``; ``timestep`` a diffusers integer timestep (scalar or ``(B,)``), scaled by
    ``num_train_timesteps`` to ``[0, 1]``. With ``num_classes > 0`` it is class-conditional, called as
    ``model(sample, timestep, class_labels=labels)`` like diffusers' class-conditional ``UNet2DModel``. Used by
    the exact-target benchmarks and the tests.
    """

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_train_timesteps: int = 1000,
                 num_classes: int = 0):
        super().__init__()
        self.net = TimeConditionedMLP(dim, dim, hidden=hidden, depth=depth, cond_dim=num_classes)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        t = _time_batch(timestep, sample.shape[0], sample.device) / self.config.num_train_timesteps
        c = None
        if self.config.num_classes:
            if class_labels is None:
                raise ValueError("this denoiser is class-conditional: pass class_labels")
            c = torch.nn.functional.one_hot(class_labels.long().reshape(-1), self.config.num_classes).float()
        eps = self.net(sample, t, c)
        if not return_dict:
            return (eps,)
        return DenoiserOutput(sample=eps)
