"""Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 encoders, byte-identical to llama.cpp's ``quantize_q4_0`` ... ``q8_0``.

Rows ``x (rows, n_per_row)`` float32 (``n_per_row`` a multiple of 32) and an optional importance vector
``qw (n_per_row,)`` -> ``uint8 (rows, n_per_row / 32 * block_bytes)``. Without ``qw`` llama.cpp runs
``quantize_row_qX_Y_ref`` (plain absmax / min-max rounding); with it ``quantize_row_qX_Y_impl``
(weights ``qw * sqrt(mean_row(x^2) + x^2)`` and a scale search); Q8_0 ignores ``qw``. On the CPU the
``_ref`` paths run in ``legacy_np`` (block-major, same bytes); the generic ports here serve torch devices
and chunks with degenerate blocks.

Block layouts (32 values; ``q[j]`` the code of element ``j``)::

    block_q4_0  d fp16 | qs[16]                  = 2 + 16          = 18 bytes   x = d*(q - 8)
    block_q4_1  d fp16 | m fp16 | qs[16]         = 2 + 2 + 16      = 20 bytes   x = d*q + m
    block_q5_0  d fp16 | qh u32 | qs[16]         = 2 + 4 + 16      = 22 bytes   x = d*(q - 16)
    block_q5_1  d fp16 | m fp16 | qh u32 | qs[16] = 2 + 2 + 4 + 16 = 24 bytes   x = d*q + m
    block_q8_0  d fp16 | qs[32] int8             = 2 + 32          = 34 bytes   x = d*q

    qs[j] = (q[j] & 15) | (q[j+16] & 15) << 4 (j < 16);  qh bit j = q[j] >> 4 (j < 32, little-endian)
"""

from __future__ import annotations

from lowbit.formats.gguf import legacy_np
from lowbit.formats.gguf.qcommon import (
    Array,
    amax,
    c_low_byte,
    cat,
    clamp_,
    contiguous,
    div,
    f32,
    first_absmax,
    first_max,
    first_min,
    fp16_bits,
    is_np,
    roundf,
    seq_sum,
    sqrtf,
    stack,
    to_i32,
    to_u8,
    where,
)
from lowbit.formats.gguf.qsearch import make_qkx_quants, make_qx_quants

QK = 32


def _blocks(x: Array) -> Array:
    """Rows ``(rows, n_per_row)`` -> element-major blocks ``(32, B)``, block ``r * n_per_row/32 + b``."""
    return contiguous(x.reshape(-1, QK).T)


def _weights(x: Array, qw: Array) -> Array:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])``, ``sigma2 = sum(x^2)/n_per_row`` of each whole row -> ``(32, B)``."""
    sigma2 = div(seq_sum((x * x).T), float(x.shape[1]))  # (rows,)
    return _blocks(qw[None, :] * sqrtf(sigma2[:, None] + x * x))


def _pack_nibbles(q: Array, mask: bool = True) -> Array:
    """Codes ``(32, B)`` (integer-valued) -> ``qs (B, 16)`` uint8, low nibbles from the first 16.

    ``mask=False`` is the ``_ref`` paths' ``qs[j] = q[j] | q[j+16] << 4`` on C ``uint8_t`` codes, where a
    code can exceed 15 (a wrapped negative ``(int8_t)`` of a non-finite ``x/d``)."""
    q = to_i32(q) & 0xFF
    lo, hi = (q[:16] & 0xF, q[16:] & 0xF) if mask else (q[:16], q[16:])
    return to_u8((lo | (hi << 4)) & 0xFF).T


def _pack_qh(q: Array) -> Array:
    """The fifth bits of codes ``(32, B)`` -> ``qh (B, 4)`` uint8 (a little-endian uint32, bit j = q[j] >> 4)."""
    h = (to_i32(q) >> 4) & 1
    out = []
    for k in range(4):
        byte = h[8 * k]
        for i in range(1, 8):
            byte = byte | (h[8 * k + i] << i)
        out.append(byte)
    return to_u8(stack(out, 1))


def _symmetric_ref(xb: Array, nmax: int, offset: float) -> tuple[Array, Array]:
    """``quantize_row_q4_0_ref`` / ``q5_0``: ``d = max / -nmax``, ``q = MIN(2*nmax-1, (int8)(x/d + offset))``."""
    _, mx = first_absmax(xb)
    d = div(mx, float(-nmax))
    idv = where(d != 0, div(1.0, d), 0.0)
    return clamp_(c_low_byte(xb * idv[None] + offset, signed=True), None, 2 * nmax - 1), d


def _affine_ref(xb: Array, nmax: int, clamp: bool) -> tuple[Array, Array, Array]:
    """``quantize_row_q4_1_ref`` / ``q5_1``: ``d = (max - min)/nmax``, ``q = (uint8)((x - min)/d + 0.5)``."""
    mn, mx = first_min(xb), first_max(xb)
    d = div(mx - mn, float(nmax))
    idv = where(d != 0, div(1.0, d), 0.0)
    v = (xb - mn[None]) * idv[None] + 0.5
    q = clamp_(c_low_byte(v, signed=True), None, nmax) if clamp else c_low_byte(v, signed=False)
    return q, d, mn


def quantize_q4_0(x: Array, qw: Array | None) -> Array:
    """Q4_0: ``_ref`` absmax rounding, or ``make_qx_quants(32, 8, rmse_type=1, weights)`` with ``qw``."""
    if qw is None and is_np(x) and (fast := legacy_np.symmetric(x, 8, five_bit=False)) is not None:
        return fast.reshape(x.shape[0], -1)
    xb = _blocks(x)
    q, d = _symmetric_ref(xb, 8, 8.5) if qw is None else make_qx_quants(xb, 8, _weights(x, qw))
    return cat([fp16_bits(d), _pack_nibbles(q, mask=False)], 1).reshape(x.shape[0], -1)


def quantize_q5_0(x: Array, qw: Array | None) -> Array:
    """Q5_0: ``_ref`` absmax rounding, or ``make_qx_quants(32, 16, rmse_type=1, weights)`` with ``qw``."""
    if qw is None and is_np(x) and (fast := legacy_np.symmetric(x, 16, five_bit=True)) is not None:
        return fast.reshape(x.shape[0], -1)
    xb = _blocks(x)
    q, d = _symmetric_ref(xb, 16, 16.5) if qw is None else make_qx_quants(xb, 16, _weights(x, qw))
    return cat([fp16_bits(d), _pack_qh(q), _pack_nibbles(q)], 1).reshape(x.shape[0], -1)


def _affine(x: Array, qw: Array | None, nmax: int) -> tuple[Array, Array, Array]:
    """Codes ``(32, B)``, fp16 ``d`` and ``m`` bytes of Q4_1 (nmax 15) / Q5_1 (nmax 31)."""
    xb = _blocks(x)
    if qw is None:
        q, d, m = _affine_ref(xb, nmax, clamp=nmax == 15)
    else:
        q, d, the_min = make_qkx_quants(xb, _weights(x, qw), nmax, f32(-0.9), f32(0.05), 36, False)
        m = -the_min
    return q, fp16_bits(d), fp16_bits(m)


def quantize_q4_1(x: Array, qw: Array | None) -> Array:
    """Q4_1: ``_ref`` min/max rounding, or ``make_qkx3_quants(32, 15, -0.9, 0.05, 36)`` with ``qw``."""
    if qw is None and is_np(x) and (fast := legacy_np.affine(x, 15)) is not None:
        return fast.reshape(x.shape[0], -1)
    q, d, m = _affine(x, qw, 15)
    return cat([d, m, _pack_nibbles(q, mask=False)], 1).reshape(x.shape[0], -1)


def quantize_q5_1(x: Array, qw: Array | None) -> Array:
    """Q5_1: ``_ref`` min/max rounding, or ``make_qkx3_quants(32, 31, -0.9, 0.05, 36)`` with ``qw``."""
    if qw is None and is_np(x) and (fast := legacy_np.affine(x, 31)) is not None:
        return fast.reshape(x.shape[0], -1)
    q, d, m = _affine(x, qw, 31)
    return cat([d, m, _pack_qh(q), _pack_nibbles(q)], 1).reshape(x.shape[0], -1)


def quantize_q8_0(x: Array, qw: Array | None) -> Array:
    """Q8_0 (``qw`` ignored, as llama.cpp): ``d = amax/127``, ``q = roundf(x/d)`` (half away from zero)."""
    del qw
    if is_np(x) and (fast := legacy_np.q8_0(x)) is not None:
        return fast.reshape(x.shape[0], -1)
    xb = _blocks(x)
    d = div(amax(abs(xb), 0), 127.0)
    idv = where(d != 0, div(1.0, d), 0.0)
    q = to_u8(c_low_byte(roundf(xb * idv[None]), signed=False)).T
    return cat([fp16_bits(d), q], 1).reshape(x.shape[0], -1)
