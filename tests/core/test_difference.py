"""Difference propagation (``kl_precision="delta"``): each rule against fp64 subtraction, attention's difference in
blocks, and the error's scale: relative to the difference, where two half-precision passes have a floor."""

import pytest
import torch
import torch.nn.functional as F

from hf_control_ft.core.difference import Difference, difference_pair, difference_parts
from hf_control_ft.core.difference_attention import attention_difference


def _pair(shape, rel, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g, dtype=torch.float64)
    d = rel * torch.randn(shape, generator=g, dtype=torch.float64)
    return h.to(dtype), d.to(dtype)


def _ops(x, c):
    """Every rule family in one function: linear layers and convolutions, norms, nonlinearities, products and
    divisions, concatenation, resampling, padding, complex RoPE, einsum, in-place writes."""
    w = torch.linspace(-1, 1, 8 * 8, dtype=x.dtype).reshape(8, 8)
    y = F.conv2d(x, w.reshape(8, 8, 1, 1)[:, :, :1, :1].expand(8, 8, 3, 3).contiguous() / 9, None, padding=1)
    y = F.silu(F.group_norm(y, 2)) + F.gelu(y, approximate="tanh")
    y = F.interpolate(y, scale_factor=2, mode="nearest")
    y = F.pad(y, (1, 1, 1, 1), value=3.0)
    t = y.flatten(2).transpose(1, 2)  # (B, L, 8)
    t = F.layer_norm(t, (8,)) * (1 + c[:, None]) + c[:, None]
    t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMSNorm as diffusers writes it
    rot = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous())
    t = torch.view_as_real(rot * torch.polar(torch.ones(4, dtype=x.dtype), torch.arange(4, dtype=x.dtype))).flatten(2)
    t = torch.einsum("blc,cd->bld", t, w) / (1 + t.abs().mean())
    out = torch.empty_like(t)
    out[..., 0::2] = t[..., 0::2] * t[..., 1::2]
    out[..., 1::2] = torch.cat([t[..., 1::2].exp(), t[..., :0]], dim=-1)
    out += t
    return F.linear(out, w, torch.ones(8, dtype=x.dtype)).sum(1)


def test_every_rule_gives_the_fp64_difference():
    xh, xd = _pair((2, 8, 4, 4), 1e-3, 0)
    ch, cd = _pair((2, 8), 1e-3, 1)
    exact = _ops(xh + xd, ch + cd) - _ops(xh, ch)
    out = _ops(difference_pair(xh, xd), difference_pair(ch, cd))
    assert isinstance(out, Difference)
    h, d = difference_parts(out)
    torch.testing.assert_close(h, _ops(xh, ch))
    assert float((d - exact).norm() / exact.norm()) < 1e-9
    # in fp32 the error is fp32's relative to the activations, not to their difference's square
    out32 = _ops(difference_pair(xh.float(), xd.float()), difference_pair(ch.float(), cd.float()))
    assert float((difference_parts(out32)[1].double() - exact).norm() / exact.norm()) < 1e-3


def test_gradients_flow_through_both_parts():
    xh, xd = _pair((2, 8, 4, 4), 1e-2, 2)
    ch, cd = _pair((2, 8), 1e-2, 3)
    xd.requires_grad_(True)
    xh.requires_grad_(True)
    d = difference_parts(_ops(difference_pair(xh, xd), difference_pair(ch, cd)))[1]
    gh, gd = torch.autograd.grad(d.pow(2).sum(), (xh, xd))
    xh2, xd2 = xh.detach().requires_grad_(True), xd.detach().requires_grad_(True)
    exact = (_ops(xh2 + xd2, ch + cd) - _ops(xh2, ch)).pow(2).sum()
    eh, ed = torch.autograd.grad(exact, (xh2, xd2))
    torch.testing.assert_close(gh, eh, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(gd, ed, rtol=1e-7, atol=1e-10)


def _attention(q, k, v, **kw):
    if kw.get("enable_gqa"):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    kw.pop("enable_gqa", None)
    return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("case", ["plain", "bool-mask", "additive-mask", "causal", "gqa", "value-only"])
def test_attention_difference_in_blocks_matches_fp64(case):
    B, H, L, S, E = 2, 4, 24, 20, 8
    kv_heads = 2 if case == "gqa" else H
    (qh, qd), (kh, kd), (vh, vd) = _pair((B, H, L, E), 1e-3, 4), _pair((B, kv_heads, S, E), 1e-3, 5), \
        _pair((B, kv_heads, S, E), 1e-3, 6)
    if case == "value-only":
        qd = kd = None
    kw = {}
    if case == "bool-mask":
        kw["attn_mask"] = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(7)) > 0.3
    elif case == "additive-mask":
        kw["attn_mask"] = torch.randn(B, 1, L, S, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    elif case == "causal":
        S, kh, kd, vh, vd = L, *_pair((B, H, L, E), 1e-3, 5), *_pair((B, H, L, E), 1e-3, 6)
        kw["is_causal"] = True
    elif case == "gqa":
        kw["enable_gqa"] = True
    plus = lambda h, d: h if d is None else h + d
    exact = _attention(plus(qh, qd), plus(kh, kd), plus(vh, vd), **kw) - _attention(qh, kh, vh, **kw)
    mask = kw.get("attn_mask")
    d = attention_difference(qh, qd, kh, kd, vh, vd, attn_mask=mask, is_causal=kw.get("is_causal", False),
                             enable_gqa=kw.get("enable_gqa", False), block_elements=B * H * S * 5)  # 5 rows a block
    assert float((d - exact).norm() / exact.norm()) < 1e-9
    # through the Difference tensor and F.scaled_dot_product_attention, with its gradient recomputed per block
    qd_ = None if qd is None else qd.clone().requires_grad_(True)
    out = F.scaled_dot_product_attention(difference_pair(qh, qd_), difference_pair(kh, kd), difference_pair(vh, vd),
                                         **kw)
    got = difference_parts(out)[1]
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-12)
    if qd_ is not None:
        (g,) = torch.autograd.grad(got.pow(2).sum(), qd_)
        q2 = qd.clone().requires_grad_(True)
        (e,) = torch.autograd.grad((_attention(qh + q2, plus(kh, kd), plus(vh, vd), **kw)
                                    - _attention(qh, kh, vh, **kw)).pow(2).sum(), q2)
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("relative", [1e-2, 1e-4])
def test_the_half_precision_error_is_relative_to_the_difference(relative):
    """bf16 everywhere: the difference keeps 1-2 % of itself at any size, while subtracting two bf16 passes leaves
    an error of the outputs' size (2^-8 of them), which swamps a small difference."""
    B, H, L, E = 2, 4, 32, 16
    (qh, qd), (kh, kd), (vh, vd) = (_pair((B, H, L, E), relative, s) for s in (8, 9, 10))
    exact = _attention(qh + qd, kh + kd, vh + vd) - _attention(qh, kh, vh)
    bf = lambda t: t.to(torch.bfloat16)
    d = attention_difference(bf(qh), bf(qd), bf(kh), bf(kd), bf(vh), bf(vd)).double()
    sub = (_attention(bf(qh + qd), bf(kh + kd), bf(vh + vd)) - _attention(bf(qh), bf(kh), bf(vh))).double()
    err = float((d - exact).norm() / exact.norm())
    assert err < 0.03
    assert float((sub - exact).norm() / exact.norm()) > 3 * err


def test_dropout_in_training_mode_is_refused():
    h, d = _pair((2, 3), 1e-2, 11)
    with pytest.raises(RuntimeError, match="eval mode"):
        F.dropout(difference_pair(h, d), 0.1, training=True)
    assert isinstance(F.dropout(difference_pair(h, d), 0.1, training=False), Difference)


def test_dora_adapters_are_refused_naming_the_flag():
    from peft import LoraConfig, inject_adapter_in_model

    from hf_control_ft.core.difference_lora import difference_mode

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], use_dora=True),
                                    torch.nn.Sequential(torch.nn.Linear(4, 4)), adapter_name="control")
    with pytest.raises(ValueError, match="--kl_precision delta.*DoRA.*--kl_precision upcast"):
        with difference_mode(model):
            model(torch.randn(2, 4))
