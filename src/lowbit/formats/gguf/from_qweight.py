"""Carry lowbit's integer codes into GGUF blocks without re-quantizing, where the grids agree.

A lowbit weight is ``W[r, j] = s[r, g] * (c[r, j] - z[r, g])`` with groups of ``gs`` input columns. The
legacy GGUF types hold blocks of 32 columns:

* Q8_0: ``d * q``, q int8            <- 8-bit symmetric, gs = 32: ``d = s``, ``q = c - 128``
* Q4_0: ``d * (q - 8)``, q 0..15     <- 4-bit symmetric, gs = 32: ``d = s``, ``q = c``
* Q5_0: ``d * (q - 16)``, q 0..31    <- 5-bit symmetric, gs = 32
* Q4_1: ``d * q + m``, q 0..15       <- 4-bit asymmetric, gs = 32: ``d = s``, ``m = -s * z``
* Q5_1: ``d * q + m``, q 0..31       <- 5-bit asymmetric, gs = 32

``d`` and ``m`` are stored in float16, so the carried block is exact when ``s`` and ``-s*z`` are
representable in float16 (bf16 scales of normal magnitude are; ``-s*z`` needs up to 13 significant bits and
is then rounded once, to the nearest float16). Block layouts are ggml's (``ggml-common.h``): nibbles ``q[j]``
and ``q[j+16]`` share byte j; the fifth bits of Q5 sit in a little-endian uint32 ``qh`` (bit j of q[j]).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme

Q = GGMLQuantizationType
_DIRECT = {(8, True): Q.Q8_0, (4, True): Q.Q4_0, (4, False): Q.Q4_1, (5, True): Q.Q5_0, (5, False): Q.Q5_1}
# the type to re-quantize to when the grid is not carried over (closest bits; k-quants take any grouping)
_CLOSEST = {2: Q.Q2_K, 3: Q.Q3_K, 4: Q.Q4_K, 5: Q.Q5_K, 6: Q.Q6_K, 7: Q.Q8_0, 8: Q.Q8_0}


def direct_type(scheme: QuantScheme, has_g_idx: bool = False) -> Q | None:
    """The GGUF type that holds ``scheme``'s codes as they are, or None."""
    if scheme.group_size != 32 or has_g_idx:
        return None
    return _DIRECT.get((scheme.bits, scheme.symmetric))


def closest_type(scheme: QuantScheme) -> Q:
    """The type a tensor of ``scheme`` is re-quantized to when its codes cannot be carried over."""
    return direct_type(scheme) or _CLOSEST[scheme.bits]


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16) bytes ``q[j] & 15 | (q[j+16] & 15) << 4``."""
    return ((q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)).astype(np.uint8)


def _qh(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes -> (n, 4) bytes of the little-endian uint32 of their fifth bits."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def encode_direct(qw: QuantizedWeight) -> tuple[Q, np.ndarray, bool]:
    """(type, uint8 (out, bytes per row), exact) for a weight whose scheme :func:`direct_type` accepts.

    ``exact``: the GGUF block decodes to exactly ``qw.dequantize()`` (no float16 rounding of d or m).
    """
    t = direct_type(qw.scheme, qw.g_idx is not None)
    if t is None:
        raise ValueError(f"scheme {qw.scheme.label} has no GGUF type that carries its codes")
    out, inp = qw.shape
    c = qw.codes.to(torch.int32).numpy().reshape(-1, 32)
    s = qw.scales.to(torch.float32).numpy().reshape(-1)
    z = qw.zeros.to(torch.float32).numpy().reshape(-1)
    if t == Q.Q8_0:
        blocks = np.concatenate([_f16(s), (c - 128).astype(np.int8).view(np.uint8)], axis=1)
    elif t == Q.Q4_0:
        blocks = np.concatenate([_f16(s), _nibbles(c)], axis=1)
    elif t == Q.Q5_0:
        blocks = np.concatenate([_f16(s), _qh(c), _nibbles(c)], axis=1)
    else:
        m = (-s * z).astype(np.float32)
        parts = [_f16(s), _f16(m), *([_qh(c)] if t == Q.Q5_1 else []), _nibbles(c)]
        blocks = np.concatenate(parts, axis=1)
    blocks = np.ascontiguousarray(blocks).reshape(out, -1)
    from gguf.quants import dequantize

    exact = bool(np.array_equal(dequantize(blocks, t).astype(np.float32), qw.dequantize(torch.float32).numpy()))
    return t, blocks, exact
