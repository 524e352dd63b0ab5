"""The canonical unpacked result of every integer weight quantizer.

Every method returns a :class:`QuantizedWeight`; every on-disk layout is a pack/unpack pair
from and to it. Shapes, for ``W (out, in)`` and ``G`` groups along the input dimension::

    codes  (out, in)  uint8, unsigned codes 0 .. 2^bits - 1
    scales (out, G)   float
    zeros  (out, G)   uint8, integer zero points (2^(bits-1) everywhere for symmetric schemes)
    g_idx  (in,)      int32 group of each input column, or None for g(j) = j // group_size

    W_hat[r, j] = scales[r, g(j)] * (codes[r, j] - zeros[r, g(j)])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.scheme import QuantScheme


@dataclass
class QuantizedWeight:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    scheme: QuantScheme
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out, inp = self.codes.shape
        groups = self.scheme.n_groups(inp)
        if self.g_idx is not None:
            groups = int(self.g_idx.max()) + 1 if self.g_idx.numel() else 0
            if self.g_idx.shape != (inp,):
                raise ValueError(f"g_idx must have shape ({inp},), got {tuple(self.g_idx.shape)}")
        if self.scales.shape != (out, groups) or self.zeros.shape != (out, groups):
            raise ValueError(
                f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} "
                f"must both be ({out}, {groups}) for codes {tuple(self.codes.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def group_index(self) -> torch.Tensor:
        """Group of each input column, ``(in,)`` int64."""
        inp = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        gs = self.scheme.group_size or inp
        return torch.arange(inp, device=self.codes.device) // gs

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat (out, in)`` in ``dtype`` (computed in float32)."""
        g = self.group_index()
        s = self.scales.to(torch.float32)[:, g]
        z = self.zeros.to(torch.float32)[:, g]
        return (s * (self.codes.to(torch.float32) - z)).to(dtype)

    def dequantize_into(self, out: torch.Tensor, rows: int = 1024) -> torch.Tensor:
        """Write ``W_hat`` into ``out (out, in)`` (its dtype and device), ``rows`` rows at a time:
        the same values as :meth:`dequantize`, with band-sized float32 temporaries only."""
        g = self.group_index().to(self.codes.device)
        for r0 in range(0, self.codes.shape[0], rows):
            sl = slice(r0, r0 + rows)
            s = self.scales[sl].to(torch.float32)[:, g]
            z = self.zeros[sl].to(torch.float32)[:, g]
            out[sl].copy_(s * (self.codes[sl].to(torch.float32) - z))
        return out

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.scheme,
            None if self.g_idx is None else self.g_idx.to(device),
        )
