"""Variable-length prompt embeddings of the chat-LLM text encoders (Z-Image, Qwen-Image): each prompt keeps only its
valid tokens, as the pipelines do. The processes carry them as ``(embeds (B, L, D) zero-padded, lengths (B,))``, so
that they batch, cache (:class:`~hf_control_ft.processes.memory.EmbeddingCache` pads rows) and move like any tensor.
"""

from __future__ import annotations

import torch


def valid_tokens(embeds: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """``(B, L, D)`` zero-padded embeddings + ``(B,)`` lengths -> the list of each row's valid tokens ``(L_i, D)``."""
    return [e[: int(n)] for e, n in zip(embeds, lengths.tolist())]


def masked_mean(embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over each row's valid tokens: ``(B, L, D), (B,) -> (B, D)`` fp32 (the condition features)."""
    mask = torch.arange(embeds.shape[1], device=embeds.device)[None, :] < lengths.to(embeds.device)[:, None]
    total = (embeds.float() * mask[..., None]).sum(1)
    return total / lengths.to(embeds.device).clamp(min=1)[:, None].float()


def padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of ``(L_i, D)`` -> ``(embeds (B, max L_i, D) zero-padded, lengths (B,) long)``."""
    length = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
    return embeds, torch.tensor([r.shape[0] for r in rows], dtype=torch.long, device=embeds.device)


def attention_mask(lengths: torch.Tensor, length: int) -> torch.Tensor | None:
    """``(B, length)`` long mask of the valid tokens, or None when every row is full (the pipelines pass None then)."""
    if bool((lengths == length).all()):
        return None
    return (torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]).long()


__all__ = ["valid_tokens", "masked_mean", "padded", "attention_mask"]
