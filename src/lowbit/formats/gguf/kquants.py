"""Q4_K, Q5_K and Q6_K encoders, byte-identical to llama.cpp's ``quantize_q4_K`` / ``q5_K`` / ``q6_K``.

Every function maps rows ``x (rows, n_per_row)`` float32 (``n_per_row`` a multiple of 256) and an optional
importance vector ``qw (n_per_row,)`` to ``uint8 (rows, n_per_row / 256 * block_bytes)``. Without ``qw``
llama.cpp runs ``quantize_row_qX_K_ref``, with it ``quantize_row_qX_K_impl``; both are ported here.

Super-block layouts (256 values, ``NB`` super-blocks)::

    block_q4_K  d fp16 | dmin fp16 | scales[12] | qs[128]             = 2 + 2 + 12 + 128       = 144 bytes
    block_q5_K  d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128]    = 2 + 2 + 12 + 32 + 128  = 176 bytes
    block_q6_K  ql[128] | qh[64] | scales[16] int8 | d fp16           = 128 + 64 + 16 + 2      = 210 bytes

    Q4_K/Q5_K: 8 sub-blocks of 32, value = d*sc[j]*q - dmin*m[j], 6-bit sc/m packed in 12 bytes:
      byte k   (k<4) = sc[k] | (sc[k+4] >> 4) << 6      byte 4+k = m[k] | (m[k+4] >> 4) << 6
      byte 8+k (k<4) = (sc[k+4] & 15) | (m[k+4] & 15) << 4
    Q6_K: 16 sub-blocks of 16, value = d*sc[j]*(q - 32), q 6 bits (low nibble in ql, 2 high bits in qh).
"""

from __future__ import annotations

from lowbit.formats.gguf.qcommon import (
    GROUP_MAX_EPS,
    Array,
    cat,
    clamp_,
    contiguous,
    div,
    f32,
    first_absmax,
    fp16_bits,
    fp16_round,
    nearest_f,
    positive_max,
    seq_sum,
    sqrtf,
    to_f32,
    to_i32,
    to_u8,
    where,
    wrap_i8,
    wrap_u8,
)
from lowbit.formats.gguf.qsearch import make_qkx_quants, make_qp_quants, make_qx_quants

QK_K = 256


def superblocks(x: Array) -> Array:
    """Rows ``(rows, n_per_row)`` -> super-blocks ``(NB, 256)`` in row-major order."""
    return x.reshape(-1, QK_K)


def subblocks(X: Array, n: int) -> Array:
    """Super-blocks ``(NB, 256)`` -> element-major sub-blocks ``(n, NB*256/n)``, sub-block ``b*(256/n) + j``."""
    return contiguous(X.reshape(-1, n).T)


def from_subblocks(L: Array) -> Array:
    """Element-major codes ``(n, NB*256/n)`` -> ``(NB, 256)``."""
    return L.T.reshape(-1, QK_K)


def row_weights(qw: Array, rows: int) -> Array:
    """The importance vector ``(n_per_row,)`` repeated for every row, as super-blocks ``(NB, 256)``."""
    return cat([qw.reshape(1, -1)] * rows, 0).reshape(-1, QK_K)


def imatrix_weights(X: Array, qw: Array, sigma_factor: float) -> Array:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` with ``sigma2 = sigma_factor*sum(x^2)/256`` per super-block.

    ``X (NB, 256)``, ``qw (n_per_row,)`` (the super-blocks of each row take consecutive slices) -> ``(NB, 256)``.
    """
    sum_x2 = seq_sum((X * X).T)
    sigma2 = div(sum_x2 * sigma_factor if sigma_factor != 1.0 else sum_x2, float(QK_K))
    return row_weights(qw, X.shape[0] * QK_K // qw.shape[0]) * sqrtf(sigma2[:, None] + X * X)


def pack_scales_k4(ls: Array, lm: Array) -> Array:
    """6-bit scales and mins ``(NB, 8)`` (int32, as C's ``uint8_t``) -> the 12 packed bytes ``(NB, 12)``."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return to_u8(cat([lo, mid, hi], 1) & 0xFF)


def unpack_scales_k4(q: Array) -> tuple[Array, Array]:
    """``get_scale_min_k4`` for j = 0..7: packed ``(NB, 12)`` uint8 -> ``sc, m (NB, 8)`` float32."""
    q = to_i32(q)
    sc = cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
    m = cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return to_f32(sc), to_f32(m)


def requantize_affine(xs: Array, L: Array, d: Array, dm: Array, nmax: int) -> Array:
    """``if (!d) continue; l = clamp(nearest_int((x + dm)/d), 0, nmax)`` per sub-block.

    ``xs, L (n, B)`` (values, codes from the search), ``d, dm (B,)`` (the rounded sub-block scale and min)."""
    new = clamp_(nearest_f(div(xs + dm[None], d[None])), 0, nmax)
    return where(d[None] != 0, new, L)


def _q45_k(x: Array, qw: Array | None, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[Array, ...]:
    """Shared Q4_K/Q5_K body: codes ``(NB, 256)`` in 0..nmax, fp16 ``d``, ``dmin`` bytes, packed scales."""
    X = superblocks(x)
    nb = X.shape[0]
    xs = subblocks(X, 32)
    if qw is None:  # quantize_row_qX_K_ref
        av_x = sqrtf(div(seq_sum(xs * xs), 32.0))
        w = av_x[None] + abs(xs)
        L, scales, mins = make_qkx_quants(xs, w, nmax, rmin, rdelta, nstep, False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale, max_min = positive_max(scales, 1), positive_max(mins, 1)
        inv_scale = where(max_scale > 0, div(63.0, max_scale), 0.0)
        inv_min = where(max_min > 0, div(63.0, max_min), 0.0)
        ls = to_i32(clamp_(wrap_u8(nearest_f(inv_scale[:, None] * scales)), None, 63))
        lm = to_i32(clamp_(wrap_u8(nearest_f(inv_min[:, None] * mins)), None, 63))
        d, dmin = div(max_scale, 63.0), div(max_min, 63.0)
    else:  # quantize_row_qX_K_impl
        w = subblocks(imatrix_weights(X, qw, 2.0), 32)
        sw8 = seq_sum(w).reshape(nb, 8).T
        L, scales, mins = make_qkx_quants(xs, w, nmax, f32(-0.9), f32(0.05), 36, False)
        Lsm, dm = make_qp_quants(cat([scales.reshape(nb, 8).T, mins.reshape(nb, 8).T], 1), 63, cat([sw8, sw8], 1))
        ls, lm = to_i32(Lsm[:, :nb].T), to_i32(Lsm[:, nb:].T)
        if nmax == 31:  # quantize_row_q5_K_impl clamps to 63, q4_K's does not
            ls, lm = where(ls > 63, 63, ls), where(lm > 63, 63, lm)
        d, dmin = dm[:nb], dm[nb:]
    packed = pack_scales_k4(ls, lm)
    sc, m = unpack_scales_k4(packed)
    dsub = (fp16_round(d)[:, None] * sc).reshape(-1)
    msub = (fp16_round(dmin)[:, None] * m).reshape(-1)
    L = to_u8(from_subblocks(requantize_affine(xs, L, dsub, msub, nmax)))
    return L, fp16_bits(d), fp16_bits(dmin), packed


def quantize_q4_k(x: Array, qw: Array | None) -> Array:
    """Q4_K: ``make_qkx2_quants(32, 15, rmin=-1, rdelta=0.1, nstep=20)`` with weights ``sqrt(mean x^2) + |x|``;
    with ``qw`` ``make_qkx3_quants(32, 15, -0.9, 0.05, 36)`` and ``make_qp_quants`` for the 6-bit scales."""
    L, d, dmin, packed = _q45_k(x, qw, 15, f32(-1.0), f32(0.1), 20)
    Lv = L.reshape(-1, 4, 2, 32)
    qs = (Lv[:, :, 0] | (Lv[:, :, 1] << 4)).reshape(-1, 128)
    return cat([d, dmin, packed, qs], 1).reshape(x.shape[0], -1)


def quantize_q5_k(x: Array, qw: Array | None) -> Array:
    """Q5_K: as Q4_K with 31 levels (``make_qkx2_quants(32, 31, -0.5, 0.1, 15)`` without ``qw``)."""
    L, d, dmin, packed = _q45_k(x, qw, 31, f32(-0.5), f32(0.1), 15)
    Lv = L.reshape(-1, 4, 2, 32)
    lo, hi = Lv & 0xF, Lv >> 4
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    qh = hi[:, 0, 0] | (hi[:, 0, 1] << 1)
    for g in range(1, 4):
        qh = qh | (hi[:, g, 0] << (2 * g)) | (hi[:, g, 1] << (2 * g + 1))
    return cat([d, dmin, packed, qh, qs], 1).reshape(x.shape[0], -1)


def quantize_q6_k(x: Array, qw: Array | None) -> Array:
    """Q6_K: ``make_qx_quants(16, 32, rmse_type=1)`` per sub-block (weights ``x^2``, or the raw ``qw``), then the
    16 scales to int8 with ``iscale = -128 / max_scale`` and requantization with the rounded scales."""
    X = superblocks(x)
    nb = X.shape[0]
    xs = subblocks(X, 16)
    qws = None if qw is None else subblocks(row_weights(qw, x.shape[0]), 16)
    L, scales = make_qx_quants(xs, 32, qws)
    amx, max_scale = first_absmax(scales.reshape(nb, 16).T)
    zero = amx < GROUP_MAX_EPS
    iscale = div(-128.0, max_scale)
    d = div(1.0, iscale)
    sc = wrap_i8(clamp_(nearest_f(iscale[:, None] * scales.reshape(nb, 16)), None, 127))
    dsub = (fp16_round(d)[:, None] * sc).reshape(-1)
    new = clamp_(nearest_f(div(xs, dsub[None])), -32, 31) + 32
    L = to_u8(from_subblocks(where(dsub[None] != 0, new, L)))
    Lv = L.reshape(nb, 2, 4, 32)
    lo, hi = Lv & 0xF, Lv >> 4
    ql = cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2).reshape(nb, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out = cat([ql, qh, to_u8(wrap_u8(sc)), fp16_bits(d)], 1)
    out[zero] = 0
    return out.reshape(x.shape[0], -1)
