"""FP8 (E4M3) weight quantization: one scale per output channel or per square block, no calibration.

E4M3 (``torch.float8_e4m3fn``, the OCP "FN" variant): 1 sign bit, 4 exponent bits (bias 7),
3 mantissa bits, no infinities; the largest finite value is ``1.75 * 2^8 = 448``, the smallest
normal ``2^-6``, subnormals down to ``2^-9``. For ``W (out, in)``::

    per channel:  s_r      = max_j |W_rj| / 448                             scale (out, 1)
    blocks of B:  s_(a,b)  = max |W_rj| over r in [aB, aB+B), j in [bB, bB+B) / 448
                                                          scale (ceil(out/B), ceil(in/B))
    s   <- round(s, scale_dtype)        the stored scale, rounded BEFORE it is used, so that
                                        dequantization uses exactly what is on disk
    s   <- max(s, min_pos(scale_dtype)) the smallest positive (subnormal) value: an all-zero
                                        row/block gets codes 0, never 0/0
    q   = float8(clamp(W / s, -448, 448))   saturating cast; the cast rounds to nearest, ties to even
    W_hat = q * s

The division runs in float32 whatever the weight's dtype. Rounding ``s`` to nearest may make it
slightly smaller than ``amax / 448``; the clamp then saturates the largest weight at 448 (an error
below half a unit of the scale dtype, relative 2^-9 for bfloat16) instead of producing NaN.

Error: for weights in E4M3's normal range (``|W| >= 2^-6 s``), ``|W_hat - W| <= 2^-4 |W|``
(half a unit of the 3-bit mantissa); below it the absolute error is at most ``2^-10 s``.

These are the numerics of compressed-tensors (``quantize`` with ``type="float", num_bits=8``:
``clamp(x / scale, -448, 448).to(float8_e4m3fn)``) given the same scale, bit for bit, with one
caveat: compressed-tensors divides in the weight's own dtype, so for a bfloat16 *model* its
quotient is rounded to bfloat16 before the float8 cast (double rounding; measured on N(0, 0.02)
weights, ~3% of codes then differ by one step, never closer to W); lowbit divides in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import SchemeError
from lowbit.core.fp8_linear import FP8_MAX, FP8Weight, expand_block_scale, fp8_dtype, saturate_cast

__all__ = ["fp8_scales", "quantize_fp8"]

SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(scheme: DataTypeScheme, scale_dtype: torch.dtype) -> None:
    if scheme.dtype != "fp8_e4m3":
        raise SchemeError(f"quantize_fp8 needs an FP8 scheme (dtype 'fp8_e4m3'), got {scheme.dtype!r}; "
                          "use the FP8 or FP8_DYNAMIC preset")
    if scale_dtype not in SCALE_DTYPES:
        raise SchemeError(f"FP8 scales are stored as bfloat16, float16 or float32, got {scale_dtype}")
    fp8_dtype()  # a clear error on a torch without float8


def fp8_scales(weight: torch.Tensor, block_size: int | None, scale_dtype: torch.dtype = torch.bfloat16
               ) -> torch.Tensor:
    """Stored scales of ``weight (out, in)``: ``(out, 1)`` per channel or ``(ceil(out/B), ceil(in/B))``.

    Computed in float32, rounded to ``scale_dtype`` (nearest), floored at its smallest positive
    (subnormal) value, ``tiny * eps``: float16 scales of small rows stay exact, as compressed-tensors
    computes them, instead of being raised to float16's smallest normal (6.1e-5, i.e. max |W| 0.027).
    Partial edge blocks take the maximum of the weights they hold (as compressed-tensors, which
    pads with zeros).
    """
    w = weight.detach().float().abs()
    if block_size is None:
        amax = w.amax(1, keepdim=True)
    else:
        out, inp = w.shape
        b = block_size
        w = F.pad(w, (0, -inp % b, 0, -out % b))
        amax = w.reshape(w.shape[0] // b, b, w.shape[1] // b, b).amax((1, 3))
    s = (amax / FP8_MAX).to(scale_dtype)
    fi = torch.finfo(scale_dtype)
    return s.clamp(min=fi.tiny * fi.eps)


def quantize_fp8(weight: torch.Tensor, scheme: DataTypeScheme, scale_dtype: torch.dtype = torch.bfloat16
                 ) -> FP8Weight:
    """Quantize ``weight (out, in)`` to float8 E4M3 with the scales of :func:`fp8_scales` (module docstring)."""
    _check(scheme, scale_dtype)
    if weight.ndim != 2:
        raise SchemeError(f"FP8 quantizes 2-D linear weights (out, in), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise SchemeError("the weight holds inf or NaN; FP8 scales would be meaningless (check the checkpoint)")
    scale = fp8_scales(weight, scheme.block_size, scale_dtype)
    if not torch.isfinite(scale).all():
        raise SchemeError(f"FP8 scales overflow {scale_dtype} (max |W| = {weight.abs().max().item():.3g}); "
                          "store them as bfloat16 or float32")
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    full = scale if scheme.block_size is None else expand_block_scale(scale, shape, scheme.block_size)
    return FP8Weight(saturate_cast(weight, full), scale, scheme)
