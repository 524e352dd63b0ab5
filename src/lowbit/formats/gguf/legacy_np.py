"""Fast numpy forms of the legacy ``_ref`` encoders (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 without an imatrix).

The same bytes as the generic ports in ``legacy``, for the common case, in block-major layout
``xb (B, 32)`` (no transpose). They apply when every block's ``id = 1/d`` is finite: then every
``x*id + offset`` lies in the code range and C's float -> int cast is numpy's truncating cast. Otherwise
(a block of values below ~1e-37, where ``1/d`` overflows) they return None and ``legacy`` runs the
generic port, which models x86's cast of inf / NaN.

The per-block maxima and minima run in torch on the same memory: ``amax(dim=1)`` over 32 values is
about 10x faster than numpy's reduction over a short inner axis. C's first-wins ties (the signed value
of largest magnitude; the sign of a zero minimum) only matter in a few blocks and are fixed there.
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32


def _rowmax(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).amax(dim=1).numpy()


def _rowmin(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).amin(dim=1).numpy()


def _scale_rows(xb: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``xb * s[:, None]`` (torch broadcasts a per-row scalar over 32 values faster than numpy)."""
    return (torch.from_numpy(xb) * torch.from_numpy(s)[:, None]).numpy()


def _inverse(d: np.ndarray) -> np.ndarray | None:
    """``id = d ? 1.0f/d : 0.0f``, or None when some ``1/d`` overflows (the generic port handles that)."""
    idv = np.zeros_like(d)
    np.divide(F32(1), d, out=idv, where=d != 0)
    return idv if bool(np.isfinite(idv).all()) else None


def _first_zero(xb: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where a block's min (or max) ``v`` is 0, the first zero of the block: C keeps the sign of the first."""
    rows = np.flatnonzero(v == 0)
    if rows.size:
        sub = xb[rows]
        v[rows] = sub[np.arange(rows.size), (sub == 0).argmax(axis=1)]
    return v


def _signed_absmax(xb: np.ndarray) -> np.ndarray:
    """``max``: the first value of largest magnitude of each block (+0.0 for an all-zero block)."""
    pos, neg = _rowmax(xb), _rowmin(xb)
    mx = np.where(pos >= -neg, pos, neg)
    ties = np.flatnonzero((pos == -neg) & (pos > 0))
    if ties.size:
        sub = xb[ties]
        mx[ties] = sub[np.arange(ties.size), np.abs(sub).argmax(axis=1)]
    return np.where(mx != 0, mx, F32(0))


def _codes(v: np.ndarray, hi: int | None) -> np.ndarray:
    """C's ``MIN(hi, (int8_t)v)`` / ``(uint8_t)v`` for ``v`` in ``[0, 2^7)``: clamp in float, truncate (uint8)."""
    if hi is not None:  # MIN(hi, trunc(v)) == trunc(min(v, hi)) for an integer hi; v >= 0 here
        np.clip(v, F32(0), F32(hi), out=v)
    return v.astype(np.uint8)


def _nibbles(q: np.ndarray, mask: bool) -> np.ndarray:
    """``qs (B, 16)``: code j in the low nibble, j + 16 in the high one (uint8 arithmetic, as C).

    On uint64 words (8 codes each; codes < 16 after the mask, so a 4-bit shift stays inside each byte):
    word k of a block's ``qs`` is word k | word k+2 << 4 of its codes."""
    if mask:
        q = q & np.uint8(15)
    w = np.ascontiguousarray(q).view(np.uint64).reshape(-1)
    out = np.empty(w.size // 2, np.uint64)
    np.bitwise_or(w[0::4], w[2::4] << np.uint64(4), out=out[0::2])
    np.bitwise_or(w[1::4], w[3::4] << np.uint64(4), out=out[1::2])
    return out.view(np.uint8)


def _qh(q: np.ndarray) -> np.ndarray:
    """``qh (B*4,)``: bit j of block b's little-endian uint32 is the fifth bit of its code j."""
    return np.packbits((q.reshape(-1) >> np.uint8(4)) & np.uint8(1), bitorder="little")


def _blocks_out(fields: list[tuple[np.ndarray, int]], n: int) -> np.ndarray:
    """Interleave per-block byte fields (flat arrays of ``n * width`` bytes) into ``(n, sum(widths))``."""
    dt = np.dtype([(f"f{i}", f"V{w}") for i, (_, w) in enumerate(fields)])
    out = np.empty(n, dt)
    for i, (a, w) in enumerate(fields):
        out[f"f{i}"] = np.ascontiguousarray(a).reshape(-1).view(f"V{w}")
    return out.view(np.uint8).reshape(n, dt.itemsize)


def _fp16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def symmetric(x: np.ndarray, nmax: int, five_bit: bool) -> np.ndarray | None:
    """Q4_0 (``nmax`` 8) / Q5_0 (16) blocks ``(B, 18 | 22)``: ``d = max/-nmax``,
    ``q = MIN(2nmax-1, (int8)(x/d + nmax + 0.5))``."""
    xb = x.reshape(-1, 32)
    d = _signed_absmax(xb) / F32(-nmax)
    idv = _inverse(d)
    if idv is None:
        return None
    v = _scale_rows(xb, idv)
    v += F32(nmax + 0.5)
    q = _codes(v, 2 * nmax - 1)
    if five_bit:
        return _blocks_out([(_fp16(d), 2), (_qh(q), 4), (_nibbles(q, True), 16)], xb.shape[0])
    return _blocks_out([(_fp16(d), 2), (_nibbles(q, False), 16)], xb.shape[0])


def affine(x: np.ndarray, nmax: int) -> np.ndarray | None:
    """Q4_1 (``nmax`` 15) / Q5_1 (31) blocks ``(B, 20 | 24)``: ``d = (max - min)/nmax``, ``m = min``,
    ``q = (int8 | uint8)((x - min)/d + 0.5)`` (Q4_1 clamps to 15)."""
    xb = x.reshape(-1, 32)
    mn, mx = _first_zero(xb, _rowmin(xb)), _first_zero(xb, _rowmax(xb))
    d = (mx - mn) / F32(nmax)
    idv = _inverse(d)
    if idv is None:
        return None
    v = _scale_rows(xb - mn[:, None], idv)
    v += F32(0.5)
    if nmax == 15:
        q = _codes(v, 15)
        return _blocks_out([(_fp16(d), 2), (_fp16(mn), 2), (_nibbles(q, False), 16)], xb.shape[0])
    q = _codes(v, None)
    return _blocks_out([(_fp16(d), 2), (_fp16(mn), 2), (_qh(q), 4), (_nibbles(q, True), 16)], xb.shape[0])


def q8_0(x: np.ndarray) -> np.ndarray | None:
    """Q8_0 blocks ``(B, 34)``: ``d = amax/127``, ``q = roundf(x/d)`` (``rint``, ties moved away from zero)."""
    xb = x.reshape(-1, 32)
    d = np.abs(np.maximum(_rowmax(xb), -_rowmin(xb))) / F32(127)  # abs: +0.0 for an all-zero block
    idv = _inverse(d)
    if idv is None:
        return None
    v = _scale_rows(xb, idv)
    r = np.rint(v)
    ties = np.flatnonzero(np.abs(v - r) == F32(0.5))
    if ties.size:  # rint rounded a tie to even; roundf rounds it away from zero
        vt, rt = v.reshape(-1)[ties], r.reshape(-1)[ties]
        r.reshape(-1)[ties] = np.where(np.abs(rt) < np.abs(vt), rt + np.sign(vt), rt)
    return _blocks_out([(_fp16(d), 2), (r.astype(np.int8), 32)], xb.shape[0])
