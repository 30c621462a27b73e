"""Memory switches of the text-to-image processes, under the names diffusers' training scripts use.

* ``pre_compute_text_embeddings``: each prompt is encoded once and its embeddings kept on the CPU
  (:class:`EmbeddingCache`); batches gather them. With a fixed prompt list every prompt is encoded before
  training starts and the text encoders leave the accelerator (T5-XXL alone is ~9 GB); a prompt seen later
  (validation) is encoded with the encoders brought back for that call.
* ``offload``: the text encoders live on the CPU and come to the accelerator only to encode
  (:func:`on_device`); a SEIKO oracle that is a model comes only for its round's answers. The denoiser and an
  ELEGANT reward model stay: they run at every step, where moving them would cost more than it frees.
* ``enable_vae_slicing``: the VAE decodes one image at a time, for the reward and the oracle (the activation
  memory of a batch decode at 1024 px dominates the reward's cost).
* ``allow_tf32`` (a script flag: PyTorch's global switch): TF32 matmuls everywhere except the network calls
  that feed a KL, which :func:`tf32_matmuls` keeps in full fp32 (the KL is a difference of two network outputs)
  unless ``kl_precision="tf32"`` asks for TF32 there too (:mod:`.upcast`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def text_encoders(pipeline) -> list[nn.Module]:
    """The pipeline's text encoders (CLIP, OpenCLIP, T5, ...) that are loaded."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [getattr(pipeline, n) for n in names if getattr(pipeline, n, None) is not None]


@contextlib.contextmanager
def on_device(modules: list[nn.Module], device, enabled: bool = True):
    """Moves ``modules`` to ``device`` for the block and back to the CPU after it (``enabled=False``: nothing)."""
    if not enabled:
        yield
        return
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")


@contextlib.contextmanager
def tf32_matmuls(on: bool):
    """TF32 matmuls and convolutions on or off for the block (CUDA), whatever the global setting; restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(on)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class EmbeddingCache:
    """Per-prompt text embeddings on the CPU.

    ``encode(prompts)`` gives a tensor or a tuple of tensors (the family's conditioning); ``batched[j]`` says
    whether part ``j`` has one row per prompt (cached row by row) or is one tensor for any batch (FLUX's
    ``text_ids``: kept once). Rows of different lengths (variable-length prompt embeddings, which the families that
    have them carry with their lengths) are zero-padded at the end to the longest row of the batch they are gathered
    into, as their pipelines pad a batch.
    """

    def __init__(self, batched: tuple[bool, ...] | None = None):
        self.batched = batched
        self.rows: dict[str, tuple] = {}
        self.shared: dict[int, torch.Tensor] = {}
        self.single = False

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, prompts: list[str], encoded) -> None:
        self.single = torch.is_tensor(encoded)
        parts = (encoded,) if self.single else tuple(encoded)
        batched = self.batched or (True,) * len(parts)
        for j, p in enumerate(parts):
            if not batched[j]:
                self.shared[j] = p.detach().cpu()
        for i, prompt in enumerate(prompts):
            self.rows[prompt] = tuple(p[i].detach().cpu() if batched[j] else None for j, p in enumerate(parts))

    def missing(self, prompts: list[str]) -> list[str]:
        return list(dict.fromkeys(p for p in prompts if p not in self.rows))

    def get(self, prompts: list[str], device):
        parts = [self.shared[j].to(device) if first is None else _stack_padded([self.rows[p][j] for p in prompts]).to(device)
                 for j, first in enumerate(self.rows[prompts[0]])]
        return parts[0] if self.single else tuple(parts)


def _stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` of rows whose first dimensions may differ, zero-padded at the end to the longest."""
    if rows[0].ndim == 0 or all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows)
    length = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r, r.new_zeros((length - r.shape[0], *r.shape[1:]))]) for r in rows])


__all__ = ["EmbeddingCache", "text_encoders", "on_device", "tf32_matmuls"]
