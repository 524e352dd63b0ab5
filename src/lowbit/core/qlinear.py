"""Runtime module: a linear layer that holds packed integer weights and computes with them.

``y = x W_hat^T + b`` with ``W_hat`` rebuilt from the packed codes (see :mod:`lowbit.core.qweight`).
This CPU path dequantizes and calls one matmul; with ``cache=True`` the dequantized weight is
kept after the first call (fast evaluation, at the memory cost of a dense weight). A fused
kernel can replace :meth:`QuantLinear.forward` later behind the same interface.

Buffers (shapes for ``W (out, in)``, ``G`` groups)::

    weight_packed  (out, ceil(in*bits/32)) int32   codes packed along ``in`` (lowbit.core.packing)
    weight_scale   (out, G)                float   the storage dtype
    weight_zero    (out, G)                uint8   integer zero points (unpacked)
    weight_g_idx   (in,)                   int32   only with act-order (empty otherwise)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.packing import pack_int32, unpack_int32
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme


class QuantLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` computing with packed low-bit weights."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero: torch.Tensor
    weight_g_idx: torch.Tensor

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, *, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, act_order: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        groups = scheme.n_groups(in_features)
        words = -(-in_features * scheme.bits // 32)
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype))
        self.register_buffer("weight_zero", torch.full((out_features, groups), scheme.sym_zero,
                                                       dtype=torch.uint8))
        self.register_buffer("weight_g_idx", torch.zeros(in_features if act_order else 0, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.cache = False
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_qweight(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> QuantLinear:
        out, inp = qw.shape
        m = cls(inp, out, qw.scheme, bias=bias is not None, dtype=dtype, act_order=qw.g_idx is not None)
        m.weight_packed.copy_(pack_int32(qw.codes, qw.scheme.bits, dim=1))
        m.weight_scale.copy_(qw.scales.to(dtype))
        m.weight_zero.copy_(qw.zeros)
        if qw.g_idx is not None:
            m.weight_g_idx.copy_(qw.g_idx)
        if bias is not None and m.bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        return m

    def qweight(self) -> QuantizedWeight:
        """The canonical unpacked form of this layer's weight."""
        codes = unpack_int32(self.weight_packed, self.scheme.bits, self.in_features, dim=1)
        g_idx = self.weight_g_idx if self.weight_g_idx.numel() else None
        return QuantizedWeight(codes, self.weight_scale, self.weight_zero, self.scheme, g_idx)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.qweight().dequantize(dtype or self.weight_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._dense
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.dequantized_weight(x.dtype).to(x.device)
            self._dense = w if self.cache else None
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label}"
