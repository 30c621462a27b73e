"""Exact differences of two networks at half-precision cost: difference propagation (``kl_precision="delta"``).

The per-step KL is ``||d||^2 / (2 sigma^2)`` with ``d = mu_ft - mu_pre`` (``docs/algorithms.md`` §9). What has to be
exact is ``d``, not the two outputs: subtracting two half-precision passes leaves a rounding error of the size of
the *outputs* (2^-8 of them in bf16), which can dwarf a small control's ``d``. Here one pass carries, for every
activation, the pretrained network's value ``h`` and the difference ``dh`` of the fine-tuned network's value from
it (``docs/numerics.md``, *Difference propagation*):

* at each LoRA layer (adapters off, so the layer computes the pretrained ``W h + b``) the difference is
  ``W dh + s B A (h + dh)`` (the hooks of :func:`~hf_control_ft.core.difference_lora.difference_mode`): the weight
  acts on ``dh`` in half precision, whose rounding now scales with ``|dh|``, not with ``|h|``;
* linear operations (reshapes, sums, concatenations, convolutions, padding, nearest / linear resampling, RoPE's
  rotations) act on ``dh`` as on ``h``; products use ``d(ab) = da (b + db) + a db``;
* every other operation (SiLU, GELU, GroupNorm / LayerNorm / RMSNorm, exp, division, ...) takes its difference in
  fp32 from the two inputs, ``g(h + dh) - g(h)``: elementwise and memory-bound, so cheap, and its rounding is
  fp32's relative to the activation (``6e-8 |g(h)|``), not half precision's;
* scaled-dot-product attention takes the softmax's difference in fp32 in query blocks,
  ``dP = P (E - c) / (1 + c)`` with ``E = expm1(dS)``, ``c = sum_j P_j E_j``, and ``d out = dP (V + dV) + P dV``
  (:func:`attention_difference`), each block recomputed in the backward pass instead of stored.

In ``kl_precision="delta"`` the activations stay fp32 and every matrix product takes half-precision inputs
(:func:`set_matmul_dtype` here, ``UpcastSwitch.matmul_dtype`` for the network's layers): tensor-core products. Their
rounding of the base values moves the point at which ``d`` is evaluated, an error relative to ``d`` itself, not to
``h`` (``docs/numerics.md`` measures it per family).

A :class:`Difference` is a tensor holding ``h`` that carries ``dh`` (``difference_parts``); ``__torch_function__``
applies the rules above, so the diffusers networks run unchanged. Gradients flow through both parts by ordinary
autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .difference_attention import attention_difference


class Difference(torch.Tensor):
    """``h`` (the base network's activation: the tensor's own value) carrying ``dh`` (the other network's activation
    minus ``h``). Build with :func:`difference_pair`; read with :func:`difference_parts`."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def difference_pair(h: torch.Tensor, d: torch.Tensor | None):
    """``h`` carrying the difference ``d`` (``None``: ``h`` itself, no difference)."""
    if d is None:
        return h
    with torch._C.DisableTorchFunctionSubclass():
        out = h.as_subclass(Difference)
    out._h, out._d = h, d
    return out


def difference_parts(t):
    """``(h, dh)`` of a :class:`Difference`; ``(t, None)`` for anything else."""
    if isinstance(t, Difference):
        return t._h, t._d
    return t, None


# ------------------------------------------------------------------------------------------------ tree helpers
def _map(fn, obj):
    if isinstance(obj, (list, tuple)):
        out = [_map(fn, o) for o in obj]
        return type(obj)(out) if not hasattr(obj, "_fields") else type(obj)(*out)
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    return fn(obj)


def _leaves(obj):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o)
    else:
        yield obj


def _base(t):
    return t._h if isinstance(t, Difference) else t


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _map2(fn, a, b):
    """``fn`` over two output structures of the same shape."""
    if isinstance(a, (list, tuple)):
        out = [_map2(fn, x, y) for x, y in zip(a, b)]
        return type(a)(out) if not hasattr(a, "_fields") else type(a)(*out)
    return fn(a, b)


def _zip(h_out, d_out):
    """Pairs an output structure of base values with the same structure of differences."""
    return _map2(lambda h, d: difference_pair(h, d) if _is_float(h) and isinstance(d, torch.Tensor) else h,
                 h_out, d_out)


def _autocast_off(args):
    device = next((t.device.type for t in _leaves(args) if isinstance(t, torch.Tensor)), "cpu")
    return torch.autocast(device_type=device, enabled=False)


# ------------------------------------------------------------------------------------------------ the rules
def _linear_rule(func):
    """Ops linear in all their floating tensor arguments: the same op on the differences (constants: zero)."""

    def rule(*args, **kwargs):
        out = func(*_map(_base, args), **_map(_base, kwargs))
        zero = lambda t: t._d if isinstance(t, Difference) else (torch.zeros_like(t) if _is_float(t) else t)
        if not any(isinstance(t, Difference) for t in _leaves((args, kwargs))) or not any(
                _is_float(t) for t in _leaves(out)):
            return out
        return _zip(out, func(*_map(zero, args), **_map(zero, kwargs)))

    return rule


def _generic(func, args, kwargs):
    """Any other op: ``g(h + dh) - g(h)`` in fp32 (fp64 stays fp64), without autocast."""
    out = func(*_map(_base, args), **_map(_base, kwargs))
    if not any(_is_float(t) for t in _leaves(out)):
        return out

    def wide(t):
        return t.float() if _is_float(t) and t.dtype in (torch.float16, torch.bfloat16) else t

    def plus(t):
        if isinstance(t, Difference):
            return wide(t._h) + t._d.to(wide(t._h).dtype) if not t._h.is_complex() else t._h + t._d
        return wide(t)

    def base(t):
        return wide(_base(t))

    with _autocast_off(args):
        perturbed = func(*_map(plus, args), **_map(plus, kwargs))
        reference = func(*_map(base, args), **_map(base, kwargs))
    return _zip(out, _map2(lambda p, r: p - r if _is_float(p) else None, perturbed, reference))


def _add(a, b, *, alpha=1, sign=1.0):
    (ha, da), (hb, db) = difference_parts(a), difference_parts(b)
    c = alpha * sign
    out = ha + hb if c == 1 else (ha - hb if c == -1 else ha + hb * c)
    parts = [t for t in (da, None if db is None else (db if c == 1 else db * c)) if t is not None]
    if not parts:
        return out
    return difference_pair(out, parts[0] if len(parts) == 1 else parts[0] + parts[1])


def _product(op, a, b, out_h):
    """``d(a op b) = da op (b + db) + a op db`` for a bilinear ``op``."""
    (ha, da), (hb, db) = difference_parts(a), difference_parts(b)
    terms = []
    if da is not None:
        terms.append(op(da, hb if db is None else hb + db))
    if db is not None:
        terms.append(op(ha, db))
    if not terms:
        return out_h
    return difference_pair(out_h, terms[0] if len(terms) == 1 else terms[0] + terms[1])


_MATMUL_DTYPE = [None]


def set_matmul_dtype(dtype: torch.dtype | None) -> None:
    """The dtype the rules' matrix products (matmul, bmm, einsum, attention) take their inputs in while a difference
    pass runs with fp32 activations (``kl_precision="delta"``: the half dtype; ``None``: the inputs' own)."""
    _MATMUL_DTYPE[0] = dtype


def _cast_product(op):
    """``op`` on inputs in the pass's matmul dtype, its result in the inputs' (wider) dtype."""
    dtype = _MATMUL_DTYPE[0]
    if dtype is None:
        return op

    def product(x, y):
        wide = torch.promote_types(x.dtype, y.dtype) if isinstance(y, torch.Tensor) else x.dtype
        return op(x.to(dtype), y.to(dtype) if isinstance(y, torch.Tensor) else y).to(wide)

    return product


def _mul(a, b):
    return _product(torch.mul, a, b, torch.mul(_base(a), _base(b)))


def _matmul(a, b):
    op = _cast_product(torch.matmul)
    return _product(op, a, b, op(_base(a), _base(b)))


def _div(a, b, *, rounding_mode=None):
    if isinstance(b, Difference) or rounding_mode is not None:
        return _generic(torch.div, (a, b), {"rounding_mode": rounding_mode} if rounding_mode else {})
    ha, da = difference_parts(a)
    return difference_pair(torch.div(ha, b), None if da is None else da / b)


def _weight_op(op):
    """``op(x, weight, bias, *rest)`` (linear, convolution): the difference is ``op(dx, weight, None, *rest)``."""

    def rule(input, weight, bias=None, *rest, **kwargs):
        if isinstance(weight, Difference) or isinstance(bias, Difference):
            return _generic(op, (input, weight, bias, *rest), kwargs)
        h, d = difference_parts(input)
        out = op(h, weight, bias, *rest, **kwargs)
        if d is None:
            return out
        if not torch.is_autocast_enabled(d.device.type):
            d = d.to(weight.dtype)
        return difference_pair(out, op(d, weight, None, *rest, **kwargs))

    return rule


def _pad(input, pad, mode="constant", value=None):
    h, d = difference_parts(input)
    out = F.pad(h, pad, mode=mode, value=value)
    if d is None:
        return out
    return difference_pair(out, F.pad(d, pad, mode=mode, value=0.0 if mode == "constant" else None))


def _dropout(input, p=0.5, training=True, inplace=False):
    if training and p > 0:
        raise RuntimeError("difference propagation needs the network in eval mode (dropout would draw different "
                           "masks for the two networks)")
    return input


def _einsum(equation, *operands):
    ops = operands[0] if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
    if len(ops) == 1:  # a permutation / reduction: linear
        return _linear_rule(torch.einsum)(equation, ops[0])
    if len(ops) != 2:
        return _generic(torch.einsum, (equation, *ops), {})
    op = _cast_product(lambda x, y: torch.einsum(equation, x, y))
    return _product(op, ops[0], ops[1], op(_base(ops[0]), _base(ops[1])))


def _baddbmm(input, batch1, batch2, *, beta=1, alpha=1):
    op = _cast_product(torch.bmm)
    prod = _product(op, batch1, batch2, op(_base(batch1), _base(batch2)))
    return _add(_mul_scalar(input, beta), _mul_scalar(prod, alpha))


def _mul_scalar(t, s):
    h, d = difference_parts(t)
    return difference_pair(h * s, None if d is None else d * s) if s != 1 else t


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    (qh, qd), (kh, kd), (vh, vd) = map(difference_parts, (query, key, value))
    kwargs = dict(attn_mask=_base(attn_mask), dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if enable_gqa:
        kwargs["enable_gqa"] = True
    half = _MATMUL_DTYPE[0]
    if half is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, **kwargs)
    else:  # the fused kernel on half inputs, its result in the activations' dtype
        mask = kwargs["attn_mask"]
        if mask is not None and mask.is_floating_point():
            kwargs["attn_mask"] = mask.to(half)
        out = F.scaled_dot_product_attention(qh.to(half), kh.to(half), vh.to(half), **kwargs).to(qh.dtype)
    if qd is None and kd is None and vd is None:
        return out
    if dropout_p:
        raise RuntimeError("difference propagation needs attention without dropout")
    return difference_pair(out, attention_difference(qh, qd, kh, kd, vh, vd, _base(attn_mask), is_causal, scale,
                                                     enable_gqa, matmul_dtype=half))


_LINEAR_FUNCS = [
    torch.cat, torch.concat, torch.stack, torch.reshape, torch.permute, torch.transpose, torch.flatten,
    torch.unflatten, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.tensor_split, torch.unbind,
    torch.narrow, torch.movedim, torch.roll, torch.flip, torch.sum, torch.mean, torch.neg, torch.repeat_interleave,
    torch.index_select, torch.gather, torch.where, torch.view_as_real, torch.view_as_complex, torch.real,
    torch.imag, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle, F.avg_pool2d, F.adaptive_avg_pool2d, torch.conj,
]
_LINEAR_METHODS = [
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "contiguous", "flatten", "unflatten",
    "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "repeat_interleave", "chunk", "split", "tensor_split",
    "unbind", "__getitem__", "narrow", "movedim", "swapaxes", "clone", "float", "half", "bfloat16", "double", "to",
    "type", "type_as", "roll", "flip", "select", "index_select", "gather", "sum", "mean", "neg", "__neg__", "detach",
    "contiguous", "cpu", "cuda", "real", "imag", "conj", "mT", "T",
]
_RULES = {F.scaled_dot_product_attention: _sdpa, F.linear: _weight_op(F.linear), F.conv1d: _weight_op(F.conv1d),
          F.conv2d: _weight_op(F.conv2d), F.conv3d: _weight_op(F.conv3d), F.pad: _pad, F.dropout: _dropout,
          torch.einsum: _einsum, torch.baddbmm: _baddbmm, torch.Tensor.baddbmm: _baddbmm}
for _f in _LINEAR_FUNCS:
    _RULES[_f] = _linear_rule(_f)
for _name in _LINEAR_METHODS:
    _attr = getattr(torch.Tensor, _name)
    _attr = _attr.__get__ if isinstance(_attr, property) or hasattr(_attr, "__get__") and not callable(_attr) else _attr
    _RULES[_attr] = _linear_rule(_attr)
for _f in (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__):
    _RULES[_f] = lambda a, b, *, alpha=1: _add(a, b, alpha=alpha)
for _f in (torch.sub, torch.Tensor.sub, torch.Tensor.__sub__):
    _RULES[_f] = lambda a, b, *, alpha=1: _add(a, b, alpha=alpha, sign=-1.0)
_RULES[torch.Tensor.__rsub__] = lambda a, b: _add(b, a, sign=-1.0)
for _f in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__):
    _RULES[_f] = _mul
for _f in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.mm,
           torch.Tensor.mm):
    _RULES[_f] = _matmul
_RULES[torch.Tensor.__rmatmul__] = lambda a, b: _matmul(b, a)
for _f in (torch.div, torch.Tensor.div, torch.Tensor.__truediv__):
    _RULES[_f] = _div
_CONSTANT_RESULTS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.randn_like,
                     torch.rand_like, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty,
                     torch.Tensor.new_full, torch.Tensor.new_tensor}
_LIKE = {torch.zeros_like, torch.empty_like}
_INPLACE = {torch.Tensor.__iadd__: torch.Tensor.__add__, torch.Tensor.__isub__: torch.Tensor.__sub__,
            torch.Tensor.__imul__: torch.Tensor.__mul__, torch.Tensor.__itruediv__: torch.Tensor.__truediv__,
            torch.Tensor.add_: torch.Tensor.add, torch.Tensor.sub_: torch.Tensor.sub,
            torch.Tensor.mul_: torch.Tensor.mul, torch.Tensor.div_: torch.Tensor.div}


def _dispatch(func, args, kwargs):
    if func in (torch.Tensor.requires_grad_, torch.Tensor.retain_grad):
        func(_base(args[0]), *args[1:], **kwargs)
        return args[0]
    if func in _CONSTANT_RESULTS:  # constants; ``empty_like(x)`` of a difference may be written into: zero difference
        out = func(*_map(_base, args), **_map(_base, kwargs))
        if isinstance(args[0], Difference) and func in _LIKE and _is_float(out):
            return difference_pair(out, torch.zeros_like(out, dtype=torch.promote_types(out.dtype, args[0]._d.dtype)))
        return out
    if func in _INPLACE or func is torch.Tensor.__setitem__:
        return _inplace(func, args, kwargs)
    rule = _RULES.get(func)
    if rule is not None:
        return rule(*args, **kwargs)
    return _generic(func, args, kwargs)


def _inplace(func, args, kwargs):
    """In-place ops: computed out of place and written back into a :class:`Difference` target (a plain target
    that would receive a difference is refused: the difference would be lost)."""
    target = args[0]
    if func is torch.Tensor.__setitem__:
        _, index, value = args
        if not isinstance(target, Difference):
            if isinstance(value, Difference):
                raise RuntimeError("difference propagation cannot write a difference into a plain tensor")
            return target.__setitem__(index, value)
        h, d = difference_parts(value)
        target._h[index] = h
        target._d[index] = 0.0 if d is None else d.to(target._d.dtype)
        return None
    result = _dispatch(_INPLACE[func], args, kwargs)
    if not isinstance(target, Difference):
        if isinstance(result, Difference) and func in (torch.Tensor.add_, torch.Tensor.sub_, torch.Tensor.mul_,
                                                       torch.Tensor.div_):
            raise RuntimeError(f"difference propagation cannot apply {func.__name__} to a plain tensor")
        return result  # a += b: Python rebinds the name
    target._h, target._d = difference_parts(result)
    if target._d is None:
        target._d = torch.zeros_like(target._h)
    return target


__all__ = ["Difference", "difference_pair", "difference_parts", "set_matmul_dtype"]
