"""LLM.int8 weights (Dettmers, Lewis, Belkada, Zettlemoyer, 2022), bitsandbytes-compatible.

Row-wise absmax int8 of ``W (out, in)``, computed on ``W`` rounded to float16 (as bitsandbytes
does before quantizing)::

    SCB[r]   = max_j |W16[r, j]|                      (float32)
    CB[r, j] = round(W16[r, j] * (127 / SCB[r]))      (int8)

At run time the activation columns holding outliers (``|x| >= threshold``, 6.0 by default) are
multiplied in 16-bit and the rest in int8 (:class:`lowbit.core.int8_linear.LLMInt8Linear`). The
paper finds those columns are few and stable across inputs; lowbit takes them from calibration
(``act_absmax``, the largest ``|x_j|`` seen per input column) and keeps the original 16-bit
weights of those columns (``outlier_weight``) instead of their int8 round trip. Columns that only
cross the threshold at run time are still split, from the int8 weights, as bitsandbytes does.
"""

from __future__ import annotations

import torch

from lowbit.core.blockwise import Int8Weight
from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import SchemeError


def int8_rowwise(w16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB int8, SCB float32)`` of a float16 ``(out, in)`` matrix (bitsandbytes' vector-wise quant)."""
    stats = w16.abs().amax(dim=1).to(torch.float32)
    cb = torch.round(w16 * (127.0 / stats.unsqueeze(-1))).to(torch.int8)
    return cb, stats


def quantize_int8(weight: torch.Tensor, scheme: DataTypeScheme, act_absmax: torch.Tensor | None = None
                  ) -> Int8Weight:
    """Quantize ``weight (out, in)``; ``act_absmax (in,)`` picks the calibrated outlier columns."""
    if scheme.dtype != "int8":
        raise SchemeError(f"quantize_int8 handles LLM.int8, not {scheme.dtype}")
    w16 = weight.to(torch.float16)
    if not torch.isfinite(w16).all():
        raise SchemeError("weights overflow float16 (|w| > 65504): LLM.int8 stores them as bitsandbytes does, "
                          "in float16; use FP8 or W8A16 for this model")
    cb, scb = int8_rowwise(w16)
    idx = ow = None
    if act_absmax is not None:
        if act_absmax.shape != (weight.shape[1],):
            raise SchemeError(f"activation statistics {tuple(act_absmax.shape)} do not fit in_features "
                              f"{weight.shape[1]}")
        idx = torch.nonzero(act_absmax.to(weight.device) >= scheme.threshold).flatten()
        ow = w16[:, idx].contiguous()
    return Int8Weight(cb, scb, scheme, idx, ow)
