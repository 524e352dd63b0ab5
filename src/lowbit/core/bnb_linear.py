"""Runtime modules for bitsandbytes-style weights: NF4/FP4 (:class:`Linear4bit`) and LLM.int8.

``Linear4bit``: ``y = x W_hat^T + b``, ``W_hat`` rebuilt from the codes and block absmax values
(:mod:`lowbit.core.blockwise`) in float32, rounded through the weight's original dtype, as
bitsandbytes' ``dequantize_4bit`` does; the dense weight is cached after the first call when
``cache`` is set.

``LLMInt8Linear`` computes as bitsandbytes' ``MatMul8bitLt`` inference path, with real int8
operands (``torch._int_mm``, int32 accumulation) for ``x (T, in)``::

    x16        = x rounded to float16
    O          = { j : max_t |x16[t, j]| >= threshold }  union the calibrated outlier columns
    SCA[t]     = max_{j not in O} |x16[t, j]|
    CA[t, j]   = round(x16[t, j] * 127 / SCA[t])      (0 on the columns O)
    y          = (CA @ CB^T) * SCA[t] * SCB[r] / 127^2 + x[:, O] @ W_O^T + b

where ``W_O`` holds the calibrated columns' original 16-bit weights and the other columns of ``O``
dequantized from int8 (``CB * SCB / 127``), exactly as bitsandbytes does for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.blockwise import INV_127, Blockwise4bitWeight, Int8Weight
from lowbit.core.dtypes import DataTypeScheme

_INV_127_SQ = 6.200124e-05  # 1/127^2 as bitsandbytes' int8_mm_dequant writes it


class Linear4bit(nn.Module):
    """Drop-in ``nn.Linear`` holding an NF4/FP4 :class:`Blockwise4bitWeight`."""

    def __init__(self, qw: Blockwise4bitWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.scheme: DataTypeScheme = qw.scheme
        self.qw = qw
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        self.cache = False
        self._dense: torch.Tensor | None = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qw.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._dense
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.qw.to(x.device).dequantize(x.dtype)
            self._dense = w if self.cache else None
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label}"


def int8_activations(x16: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise int8 of float16 ``x (T, in)`` with outliers (``|x| >= threshold``) left out.

    Returns ``CA (T, in)`` int8 (zero on outlier columns), ``SCA (T,)`` float32 and the outlier
    columns ``(k,)`` int64, following bitsandbytes' ``int8_vectorwise_quant``.
    """
    outliers = x16.abs() >= threshold
    cols = torch.nonzero(outliers.any(dim=0)).flatten()
    xin = x16.masked_fill(outliers, 0) if cols.numel() else x16
    stats = xin.abs().amax(dim=1).to(torch.float32)
    inv = torch.where(stats > 0, 127.0 / stats, torch.zeros_like(stats))  # all-zero rows stay 0, not NaN
    ca = torch.round(xin * inv.unsqueeze(-1)).to(torch.int8)
    if x16.shape[0] > 1 and cols.numel():
        ca[:, cols] = 0
    return ca, stats, cols


def int8_matmul(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """``CA (T, in) @ CB (out, in)^T`` in int32 (``torch._int_mm``; an exact int64 matmul where it is missing)."""
    try:
        return torch._int_mm(ca, cb.t())
    except RuntimeError:  # shapes or devices _int_mm does not take
        return (ca.to(torch.int64) @ cb.to(torch.int64).t()).to(torch.int32)


class LLMInt8Linear(nn.Module):
    """Drop-in ``nn.Linear`` computing LLM.int8 (int8 activations and weights, 16-bit outliers)."""

    def __init__(self, w: Int8Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.scheme: DataTypeScheme = w.scheme
        self.w = w
        self.threshold = w.scheme.threshold
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        self.cache = False  # kept for interface parity with the other runtime modules

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.w.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a = x.reshape(-1, shape[-1])
        if self.w.CB.device != a.device:
            self.w = self.w.to(a.device)
        ca, sca, cols = int8_activations(a.to(torch.float16), self.threshold)
        static = self.w.outlier_idx
        if static is not None and static.numel():
            cols = torch.unique(torch.cat([cols, static]))
            ca[:, static] = 0  # calibrated columns never go through int8
        acc = int8_matmul(ca, self.w.CB)
        out = acc * (sca[:, None] * self.w.SCB[None, :]) * _INV_127_SQ
        if self.bias is not None:
            out += self.bias
        out = out.to(a.dtype)
        if cols.numel():
            sub_w = self.w.CB[:, cols].to(torch.float32) * self.w.SCB[:, None] * INV_127
            if static is not None and static.numel() and self.w.outlier_weight is not None:
                pos = torch.searchsorted(cols, static)
                sub_w[:, pos] = self.w.outlier_weight.to(torch.float32)
            out = out.addmm(a[:, cols], sub_w.to(a.dtype).t())
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        n = 0 if self.w.outlier_idx is None else self.w.outlier_idx.numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold:g}, " \
               f"calibrated_outlier_columns={n}"
