"""An exponential moving average of the LoRA control's weights (``--use_ema``), as diffusers' training scripts keep
one of the weights they train.

After every drift step ``ema <- d ema + (1 - d) theta`` with diffusers' warm-up ``d = min(ema_decay, (1 + n) / (10 +
n))`` at update ``n`` (the average forgets its zero-control start quickly, then averages over about
``1 / (1 - ema_decay)`` steps). Sampling during training (validation images) and every save use the average; when
the drift stage ends the average becomes the adapter's weights, so the saved, pushed and sampled model is the EMA
one. Checkpoints keep it (``ema.*`` entries beside the LoRA weights).
"""

from __future__ import annotations

import contextlib

import torch

#: prefix of the average's entries in a checkpoint's weights file
PREFIX = "ema."


class LoraEMA:
    """The moving average of ``params`` (the LoRA parameters, in order)."""

    def __init__(self, params, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay!r}")
        self.params = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in self.params]
        self.num_updates = 0

    def decay_at(self, n: int) -> float:
        """The decay of update ``n`` (0-based): diffusers' warm-up, capped at ``decay``."""
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay_at(self.num_updates)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The average in the parameters' place (sampling, saving); the trained weights are restored after."""
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                tmp = p.detach().clone()
                p.copy_(s)
                s.copy_(tmp)
        try:
            yield
        finally:
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params):
                    tmp = p.detach().clone()
                    p.copy_(s)
                    s.copy_(tmp)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """The average becomes the weights (the end of training)."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"{PREFIX}{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)}
        out[f"{PREFIX}num_updates"] = torch.tensor(self.num_updates)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, s in enumerate(self.shadow):
                s.copy_(state[f"{PREFIX}{i}"].to(s.device, s.dtype))
        self.num_updates = int(state[f"{PREFIX}num_updates"])


def split_state(weights: dict) -> tuple[dict, dict | None]:
    """A checkpoint's weights -> ``(LoRA weights, the average's state or None)``."""
    ema = {k: v for k, v in weights.items() if k.startswith(PREFIX)}
    return {k: v for k, v in weights.items() if not k.startswith(PREFIX)}, (ema or None)


__all__ = ["LoraEMA", "split_state", "PREFIX"]
