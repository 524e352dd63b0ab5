"""Bit-exact primitives of llama.cpp's quantizers (``ggml/src/ggml-quants.c``), vectorised over blocks.

llama.cpp builds ``ggml-quants.c`` for baseline x86-64: every float operation is one IEEE float32
operation in source order (no FMA, no reordered sums). The ports keep that contract:

* all arithmetic in float32, one array op per C operation, in C's order (``w*l*l`` is ``(w*l)*l``);
* sums over the elements of a block are sequential, ``acc += p[i]`` for ``i = 0..n-1`` (``seq_sum``),
  never a library ``sum`` (pairwise / vectorised order rounds differently);
* ``sqrtf`` is correctly rounded (torch's vectorised CPU float32 sqrt is not: it goes through float64);
* divisions go through ``div``: ``scalar / tensor`` in torch is ``tensor.reciprocal() * scalar`` and CUDA
  divides by a Python scalar as a multiplication by its reciprocal; both round differently;
* ``nearest_int(v)`` is ``(bits(v + 12582912.f) & 0x7fffff) - 0x400000``: round half to even while
  ``|v| <= 4194303``; ``rint_`` where the argument is provably in that range, the bit trick elsewhere;
* C's float -> int casts are x86's (``c_int``: truncation, INT_MIN for NaN / inf / overflow);
* C's first-wins ties (``if (ax > amax)``) take the first maximal index, and a minimum or maximum keeps
  the sign of the first zero it met (``first_min`` / ``first_max``).

Arrays are numpy on the CPU (lower per-call cost, and ``np.add.reduce`` over a leading axis is a
sequential sum in one call) and torch tensors on other devices; every helper here takes either.
Layout: a group of ``n`` values of ``B`` blocks is element-major, ``x (n, B)``, so ``x[i]`` (element
``i`` of every block) is contiguous. Integer codes are float32 arrays holding integers (what C converts
them to in ``w*l``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import Tensor

Array: TypeAlias = Any  # np.ndarray (CPU) or torch.Tensor (other devices), float32 unless stated

GROUP_MAX_EPS = float(np.float32(1e-15))  # the C macro 1e-15f
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


def is_np(a: Array) -> bool:
    return isinstance(a, np.ndarray)


def f32(v: float) -> float:
    """The float32 value of a C ``float`` literal such as ``0.1f`` (as a Python float, exact in float32)."""
    return float(np.float32(v))


def like(values: np.ndarray | float, ref: Array) -> Array:
    """A float32 numpy array or Python float as an array of ``ref``'s kind (and device)."""
    v = np.asarray(values, dtype=np.float32)
    return v if is_np(ref) else torch.from_numpy(v).to(ref.device)


def _is_array(a: object) -> bool:
    return isinstance(a, np.ndarray | Tensor)


def div(a: Array | float, b: Array | float) -> Array:
    """IEEE float32 ``a / b``, a scalar on either side turned into a float32 array of the other's kind."""
    ref = a if _is_array(a) else b
    a = a if _is_array(a) else like(float(a), ref)
    b = b if _is_array(b) else like(float(b), ref)
    return np.divide(a, b) if is_np(ref) else torch.div(a, b)


def where(c: Array, a: Array | float, b: Array | float) -> Array:
    """``c ? a : b`` elementwise (a Python float operand takes the float32 of the array operand)."""
    return np.where(c, a, b) if is_np(c) else torch.where(c, a, b)


def mul(a: Array, b: Array, out: Array | None = None) -> Array:
    if is_np(a):
        return np.multiply(a, b, out=out)
    return torch.mul(a, b, out=out) if out is not None else torch.mul(a, b)


def sub(a: Array, b: Array, out: Array | None = None) -> Array:
    if is_np(a):
        return np.subtract(a, b, out=out)
    return torch.sub(a, b, out=out) if out is not None else torch.sub(a, b)


def rint_(a: Array) -> Array:
    """In-place round half to even (= ``nearest_int`` for ``|a| <= 4194303``)."""
    return np.rint(a, out=a) if is_np(a) else a.round_()


def clamp_(a: Array, lo: float | None = None, hi: float | None = None) -> Array:
    if is_np(a):  # np.clip with two bounds is the fast (SIMD) path; one bound or np.minimum is 3x slower
        return np.clip(a, np.float32(-np.inf if lo is None else lo), np.float32(np.inf if hi is None else hi), out=a)
    return a.clamp_(min=lo, max=hi)


def abs_(a: Array) -> Array:
    return np.abs(a, out=a) if is_np(a) else a.abs_()


def sqrtf(v: Array) -> Array:
    """C ``sqrtf``, correctly rounded (numpy's float32 sqrt is; torch's CPU one goes through float64)."""
    return np.sqrt(v) if is_np(v) else torch.sqrt(v.to(torch.float64)).to(torch.float32)


def amax(a: Array, axis: int) -> Array:
    return a.max(axis=axis) if is_np(a) else a.amax(dim=axis)


def amin(a: Array, axis: int) -> Array:
    return a.min(axis=axis) if is_np(a) else a.amin(dim=axis)


def take(a: Array, idx: Array, axis: int) -> Array:
    """``a`` at index ``idx`` along ``axis`` (idx has ``a``'s shape without that axis)."""
    if is_np(a):
        return np.take_along_axis(a, np.expand_dims(idx, axis), axis=axis).squeeze(axis)
    return a.gather(axis, idx.unsqueeze(axis)).squeeze(axis)


def cat(parts: Sequence[Array], axis: int) -> Array:
    return np.concatenate(parts, axis=axis) if is_np(parts[0]) else torch.cat(list(parts), dim=axis)


def stack(parts: Sequence[Array], axis: int = 0) -> Array:
    return np.stack(parts, axis=axis) if is_np(parts[0]) else torch.stack(list(parts), dim=axis)


def contiguous(a: Array) -> Array:
    return np.ascontiguousarray(a) if is_np(a) else a.contiguous()


def copy(a: Array) -> Array:
    return a.copy() if is_np(a) else a.clone()


def empty(shape: tuple[int, ...], ref: Array) -> Array:
    return np.empty(shape, dtype=np.float32) if is_np(ref) else torch.empty(shape, device=ref.device)


def any_(a: Array) -> bool:
    return bool(a.any())


def nonzero(a: Array) -> Array:
    """Indices of the true entries of a 1-D mask."""
    return np.flatnonzero(a) if is_np(a) else a.nonzero()[:, 0]


def to_i32(a: Array) -> Array:
    return a.astype(np.int32) if is_np(a) else a.to(torch.int32)


def to_f32(a: Array) -> Array:
    return a.astype(np.float32) if is_np(a) else a.to(torch.float32)


def to_u8(a: Array) -> Array:
    """Integer codes (integer or integer-valued float array, values 0..255) as uint8."""
    return to_i32(a).astype(np.uint8) if is_np(a) else a.to(torch.int32).to(torch.uint8)


def nearest_int(v: Array) -> Array:
    """C ``nearest_int(v)`` for any float32 ``v`` (also out of its asserted range), as int32.

    A NaN argument (``0 * inf`` in a degenerate block) gives 0: x86 makes the NaN of an invalid operation
    the default NaN ``0xffc00000``, whose mantissa bits give 0; CUDA's canonical NaN would not."""
    s = v + _MAGIC if is_np(v) else v + float(_MAGIC)
    bits = s.view(np.int32) if is_np(v) else s.view(torch.int32)
    r = (bits & 0x7FFFFF) - 0x400000
    return where(v != v, 0, r)


def nearest_f(v: Array) -> Array:
    """``nearest_int(v)`` as float32, for any ``v``: ``rint`` when every value is in range (the usual case,
    two passes cheaper), else the bit trick."""
    if is_np(v) and v.size and bool(abs(v).max() < 4.0e6):  # NaN compares False
        return np.rint(v)
    return to_f32(nearest_int(v))


def wrap_u8(v: Array) -> Array:
    """An integer value (integer-valued float array) stored into a C ``uint8_t``: ``v mod 256``."""
    return to_f32(to_i32(v) & 0xFF)


def wrap_i8(v: Array) -> Array:
    """An integer value stored into a C ``int8_t``: two's complement wrap to -128..127."""
    return to_f32(((to_i32(v) + 128) & 0xFF) - 128)


def c_int(v: Array) -> Array:
    """C's float -> int conversion as x86 does it (``cvttss2si`` / ``cvttps2dq``): truncation toward zero,
    and INT_MIN for NaN, inf or anything outside int32 (a block of tiny values gives ``1/d = inf``).
    Returned as integer-valued float32."""
    t = np.trunc(v) if is_np(v) else torch.trunc(v)
    return where(abs(v) < 2147483648.0, t, -2147483648.0)


def c_low_byte(v: Array, signed: bool) -> Array:
    """``(int8_t)v`` / ``(uint8_t)v`` for a float ``v``: the low byte of ``c_int(v)``, as float32."""
    b = c_int(v)
    b = (b.astype(np.int64) if is_np(b) else b.to(torch.int64)) & 0xFF
    return to_f32(((b ^ 0x80) - 0x80) if signed else b)


def roundf(v: Array) -> Array:
    """C ``roundf``: round half away from zero (``trunc`` plus one step where the fraction is >= 0.5)."""
    t = np.trunc(v) if is_np(v) else torch.trunc(v)
    sign = np.sign(v) if is_np(v) else torch.sign(v)
    return t + where(abs(v - t) >= 0.5, sign, 0.0)


def seq_sum(p: Array, axis: int = 0) -> Array:
    """``float s = 0; for i: s += p[i]`` along ``axis`` (0 or 1), sequentially: ``p (n, ...) -> (...)``."""
    return seq_sum_from_first(p, axis) + 0.0  # 0 + p[0] + ...: differs from p[0] + ... only by -0.0 -> +0.0


def seq_sum_from_first(p: Array, axis: int = 0) -> Array:
    """``float s = p[0]; for i >= 1: s += p[i]`` along ``axis`` (a sum seeded with its first term).

    numpy reduces over a non-innermost axis element by element in index order (``out += p[i]``, one call);
    only a reduction over the innermost axis (here: one element left per sum) is pairwise, so that case
    and torch tensors take the explicit loop. The tests check the order against the loop.
    """
    if axis == 1:
        if is_np(p) and p[:, 0].size > p.shape[0]:  # more than one sum per leading index: not innermost
            return np.add.reduce(np.ascontiguousarray(p), axis=1)
        return stack([seq_sum_from_first(p[k]) for k in range(p.shape[0])])
    if is_np(p) and p[0].size > 1:
        return np.add.reduce(np.ascontiguousarray(p), axis=0)
    acc = copy(p[0])
    for i in range(1, p.shape[0]):
        acc += p[i]
    return acc


def first_absmax(x: Array) -> tuple[Array, Array]:
    """``amax = 0, max = 0; for i: if (fabsf(x[i]) > amax) {amax = fabsf(x[i]); max = x[i];}`` over dim 0.

    ``x (n, B) -> (amax (B,), max (B,))``: ``max`` is the first element of largest magnitude, +0.0 when all are 0.
    From the column max ``hi`` and min ``lo`` (fast reductions over the leading axis): ``max`` is ``hi`` or
    ``lo``, whichever is larger in magnitude; only columns holding both ``a`` and ``-a`` need the first index.
    """
    hi, lo = amax(x, 0), amin(x, 0)
    am = where(hi >= -lo, hi, -lo)
    mx = where(hi >= -lo, hi, lo)
    ties = nonzero((hi == -lo) & (hi > 0))
    if ties.shape[0]:
        sub = x[:, ties]
        idx = abs(sub).argmax(axis=0) if is_np(sub) else abs(sub).argmax(dim=0)
        mx[ties] = take(sub, idx, 0)
    return am, where(am > 0, mx, 0.0)


def _first_equal(x: Array, v: Array) -> Array:
    """The first element of each column of ``x (n, B)`` equal to ``v (B,)`` (keeps the sign of a first zero)."""
    eq = x == v[None]
    idx = eq.argmax(axis=0) if is_np(x) else eq.to(torch.uint8).argmax(dim=0)
    return take(x, idx, 0)


def first_min(x: Array) -> Array:
    """``min = x[0]; for i: if (x[i] < min) min = x[i]`` over dim 0 of ``x (n, B)``, signed zero included."""
    return _first_equal(x, amin(x, 0))


def first_max(x: Array) -> Array:
    """``max = x[0]; for i: if (x[i] > max) max = x[i]`` over dim 0 of ``x (n, B)``, signed zero included."""
    return _first_equal(x, amax(x, 0))


def positive_max(x: Array, axis: int) -> Array:
    """``m = 0; for i: if (x[i] > m) m = x[i]`` (the largest positive value, else +0.0)."""
    m = amax(x, axis)
    return where(m > 0, m, 0.0)


def fp16_bits(v: Array) -> Array:
    """GGML_FP32_TO_FP16 (round to nearest even) as little-endian bytes: ``v (B,) -> uint8 (B, 2)``."""
    if is_np(v):
        return v.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return v.to(torch.float16).view(torch.uint8).view(-1, 2)


def fp16_round(v: Array) -> Array:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): ``v`` rounded to float16 and back."""
    return v.astype(np.float16).astype(np.float32) if is_np(v) else v.to(torch.float16).to(torch.float32)
