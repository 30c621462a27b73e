"""The difference of scaled-dot-product attention between two networks, in fp32 where it cancels
(:mod:`hf_control_ft.core.difference`, ``kl_precision="delta"``).

With scores ``S = q k^T s`` of the base network and ``S + dS`` of the other, ``P = softmax(S)`` and
``E = expm1(dS)``, the other network's probabilities are ``P (1 + E) / (1 + c)`` with ``c = sum_j P_j E_j``, so

    dP = P (E - c) / (1 + c),        d out = dP (v + dv) + P dv,

with no difference of two nearly equal numbers anywhere: ``dS = dq (k + dk)^T s + q dk^T s`` is a product of
differences (half precision is relative to it), ``expm1`` is exact near 0, and the two products of ``d out`` act on
differences again. Queries are processed in blocks of at most ``block_elements`` scores, each recomputed in the
backward pass (``torch.utils.checkpoint``) rather than stored: memory is one block's scores, as in flash attention.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def attention_difference(qh, qd, kh, kd, vh, vd, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                         block_elements: int = 2 ** 24, matmul_dtype: torch.dtype | None = None):
    """``softmax((q+dq)(k+dk)^T s) (v+dv) - softmax(q k^T s) v`` for ``(B, H, L, E)`` inputs (``None``: no
    difference), in blocks of queries of at most ``block_elements`` scores, each recomputed in backward.
    ``matmul_dtype``: the four products take their inputs in this (half) dtype; the result is in the inputs' dtype."""
    if enable_gqa and kh.shape[-3] != qh.shape[-3]:
        rep = qh.shape[-3] // kh.shape[-3]
        kh, vh = kh.repeat_interleave(rep, -3), vh.repeat_interleave(rep, -3)
        kd = None if kd is None else kd.repeat_interleave(rep, -3)
        vd = None if vd is None else vd.repeat_interleave(rep, -3)
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    L, S = qh.shape[-2], kh.shape[-2]
    mask = attn_mask
    if is_causal:
        mask = torch.ones(L, S, dtype=torch.bool, device=qh.device).tril()
    rows = max(1, block_elements // max(1, qh[..., :1, :1].numel() * S))
    kt = kh if kd is None else kh + kd
    vt = vh if vd is None else vh + vd
    outs = []
    for start in range(0, L, rows):
        sl = slice(start, start + rows)
        m = None if mask is None else (mask[..., sl, :] if mask.shape[-2] == L else mask)
        args = (qh[..., sl, :], None if qd is None else qd[..., sl, :], kh, kd, kt, vt, vd, m, scale, matmul_dtype)
        grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)
        outs.append(checkpoint(_attention_block, *args, use_reentrant=False) if grad else _attention_block(*args))
    return torch.cat(outs, dim=-2)


def _wide(t: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision tensors; fp32 / fp64 stay as they are."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _attention_block(qh, qd, kh, kd, kt, vt, vd, mask, scale, matmul_dtype):
    wide = _wide(qh)
    autocast = torch.is_autocast_enabled(qh.device.type)

    def mm(x, y):
        if matmul_dtype is not None:
            x, y = x.to(matmul_dtype), y.to(matmul_dtype)
        elif not autocast:
            x, y = x.to(torch.promote_types(x.dtype, y.dtype)), y.to(torch.promote_types(x.dtype, y.dtype))
        return torch.matmul(x, y).to(wide)

    qs = qh * scale
    s = mm(qs, kh.transpose(-1, -2))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(wide)
    p = torch.softmax(s, dim=-1)
    ds = None
    if qd is not None:
        ds = mm(qd * scale, kt.transpose(-1, -2))
    if kd is not None:
        term = mm(qs, kd.transpose(-1, -2))
        ds = term if ds is None else ds + term
    out = None
    if ds is not None:
        e = torch.expm1(ds.clamp(max=60.0))  # a score difference of 60 nats would be a different network anyway
        c = (p * e).sum(-1, keepdim=True)
        dp = p * (e - c) / (1 + c)
        if mask is not None:
            dp = torch.nan_to_num(dp)  # rows masked out entirely
        out = mm(dp, vt)
    if vd is not None:
        pv = mm(p, vd)
        out = pv if out is None else out + pv
    return out


__all__ = ["attention_difference"]
