"""Q2_K and Q3_K encoders, byte-identical to llama.cpp's ``quantize_q2_K`` / ``quantize_q3_K``.

Same contract as ``kquants``: rows ``x (rows, n_per_row)`` float32 and optional ``qw (n_per_row,)`` ->
``uint8 (rows, n_per_row / 256 * block_bytes)``; ``_ref`` path without ``qw``, ``_impl`` path with it.

Super-block layouts (256 values in 16 sub-blocks of 16)::

    block_q2_K  scales[16] | qs[64] | d fp16 | dmin fp16               = 16 + 64 + 2 + 2      = 84 bytes
        scales[j] = sc[j] | m[j] << 4 (4 bits each); value = d*sc[j]*q - dmin*m[j], q 2 bits
    block_q3_K  hmask[32] | qs[64] | scales[12] | d fp16               = 32 + 64 + 12 + 2     = 110 bytes
        6-bit scales s[j] (stored s + 32): byte j (j<8) = s[j] & 15 | (s[j+8] & 15) << 4,
        byte 8+k = sum over i<4 of (s[k+4i] >> 4) << 2i; value = d*(s[j]-32)*(q-4), q 3 bits:
        the low 2 in qs, the high one in hmask[m] bit k for element 32k + m

    qs (both): byte 32h + l (h<2, l<32) = q[128h+l] | q[128h+l+32] << 2 | q[128h+l+64] << 4 | q[128h+l+96] << 6
"""

from __future__ import annotations

from lowbit.formats.gguf.kquants import from_subblocks, imatrix_weights, requantize_affine, subblocks, superblocks
from lowbit.formats.gguf.qcommon import (
    Array,
    cat,
    clamp_,
    div,
    f32,
    first_absmax,
    fp16_bits,
    fp16_round,
    nearest_f,
    positive_max,
    seq_sum,
    to_f32,
    to_i32,
    to_u8,
    where,
    wrap_i8,
    wrap_u8,
)
from lowbit.formats.gguf.qsearch import make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants


def pack_2bit(L: Array) -> Array:
    """Codes ``(NB, 256)`` uint8 in 0..3 -> ``qs (NB, 64)``."""
    Lv = L.reshape(-1, 2, 4, 32)
    return (Lv[:, :, 0] | (Lv[:, :, 1] << 2) | (Lv[:, :, 2] << 4) | (Lv[:, :, 3] << 6)).reshape(-1, 64)


def quantize_q2_k(x: Array, qw: Array | None) -> Array:
    """Q2_K. Without ``qw``: ``make_qkx2_quants(16, 3, w=|x|, -0.5, 0.1, 15, use_mad)`` per sub-block and 4-bit
    scales / mins from ``iscale = 15 / max``. With ``qw``: weights ``qw*sqrt(mean x^2 + x^2)``,
    ``make_qkx3_quants(16, 3, -0.9, 0.05, 36)`` and ``make_qp_quants(16, 15)`` for scales and mins."""
    X = superblocks(x)
    nb = X.shape[0]
    xs = subblocks(X, 16)
    if qw is None:
        L, scales, mins = make_qkx_quants(xs, abs(xs), 3, f32(-0.5), f32(0.1), 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale, max_min = positive_max(scales, 1), positive_max(mins, 1)
        ls = to_i32(wrap_u8(nearest_f(div(15.0, max_scale)[:, None] * scales)))
        lm = to_i32(nearest_f(div(15.0, max_min)[:, None] * mins))
        ls = where(max_scale[:, None] > 0, ls, 0)
        sb = where(max_min[:, None] > 0, ls | (lm << 4), ls) & 0xFF
        d = where(max_scale > 0, div(max_scale, 15.0), 0.0)
        dmin = where(max_min > 0, div(max_min, 15.0), 0.0)
    else:
        w = subblocks(imatrix_weights(X, qw, 1.0), 16)
        sw16 = seq_sum(w).reshape(nb, 16).T
        L, scales, mins = make_qkx_quants(xs, w, 3, f32(-0.9), f32(0.05), 36, False)
        Lsm, dm = make_qp_quants(cat([scales.reshape(nb, 16).T, mins.reshape(nb, 16).T], 1), 15, cat([sw16, sw16], 1))
        sb = (to_i32(Lsm[:, :nb].T) | (to_i32(Lsm[:, nb:].T) << 4)) & 0xFF
        d, dmin = dm[:nb], dm[nb:]
    dsub = (fp16_round(d)[:, None] * to_f32(sb & 0xF)).reshape(-1)
    msub = (fp16_round(dmin)[:, None] * to_f32(sb >> 4)).reshape(-1)
    L = to_u8(from_subblocks(requantize_affine(xs, L, dsub, msub, 3)))
    return cat([to_u8(sb), pack_2bit(L), fp16_bits(d), fp16_bits(dmin)], 1).reshape(x.shape[0], -1)


def pack_scales_q3(s: Array) -> Array:
    """6-bit scales ``(NB, 16)`` int32 in 0..63 (C's ``l + 32``) -> the 12 packed bytes ``(NB, 12)``."""
    lo = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    h = s >> 4
    hi = h[:, 0:4] | (h[:, 4:8] << 2) | (h[:, 8:12] << 4) | (h[:, 12:16] << 6)
    return to_u8(cat([lo, hi], 1) & 0xFF)


def quantize_q3_k(x: Array, qw: Array | None) -> Array:
    """Q3_K. Without ``qw``: ``make_q3_quants(16, 4, do_rmse)`` per sub-block, 6-bit signed scales from
    ``iscale = -32 / max_scale``. With ``qw``: weights ``qw*sqrt(2*mean x^2 + x^2)``, ``make_qx_quants(16, 4)``
    per sub-block and ``make_qx_quants(16, 32)`` (weighted by the sub-block weight sums) for the scales."""
    X = superblocks(x)
    nb = X.shape[0]
    xs = subblocks(X, 16)
    if qw is None:
        L, scales = make_q3_quants(xs, 4)
        _, max_scale = first_absmax(scales.reshape(nb, 16).T)
        iscale = div(-32.0, max_scale)
        s = to_i32(clamp_(wrap_i8(nearest_f(iscale[:, None] * scales.reshape(nb, 16))), -32, 31) + 32)
        s = where(max_scale[:, None] != 0, s, 0)
        d = where(max_scale != 0, div(1.0, iscale), 0.0)
        sc = where(max_scale[:, None] != 0, s - 32, -32)  # what the packed bytes decode to
    else:
        w = subblocks(imatrix_weights(X, qw, 2.0), 16)
        L, scales = make_qx_quants(xs, 4, w)
        Ls, d = make_qx_quants(scales.reshape(nb, 16).T, 32, seq_sum(w).reshape(nb, 16).T)
        s = to_i32(Ls.T)
        sc = s - 32
    packed = pack_scales_q3(s)
    dsub = (fp16_round(d)[:, None] * to_f32(sc)).reshape(-1)
    new = clamp_(nearest_f(div(xs, dsub[None])), -4, 3) + 4
    L = to_u8(from_subblocks(where(dsub[None] != 0, new, L)))
    hm = to_u8(L > 3).reshape(nb, 8, 32)
    hmask = hm[:, 0]
    for k in range(1, 8):
        hmask = hmask | (hm[:, k] << k)
    return cat([hmask, pack_2bit(L & 3), packed, fp16_bits(d)], 1).reshape(x.shape[0], -1)
