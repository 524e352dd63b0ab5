"""Canonical forms of bitsandbytes-style weights: block-wise 4-bit (NF4/FP4) and LLM.int8.

Block-wise 4-bit, for ``W (out, in)`` flattened row-major into ``n = out * in`` values and cut
into ``B = ceil(n / block_size)`` blocks::

    codes   (out, in)  uint8    index 0..15 into the code book ``code4(kind)``
    absmax  (B,)       float32  block absolute maxima, or, with double quantization:
    qabsmax (B,)       uint8    index into the 8-bit dynamic map ``code2 (256,)``
    absmax2 (B2,)      float32  absmax of each block of 256 (absmax - offset) values
    offset  ()         float32  mean of the absmax values

    absmax[b]   = code2[qabsmax[b]] * absmax2[b // 256] + offset        (double quantization)
    W_hat[r, j] = code[codes[r, j]] * absmax[(r * in + j) // block_size]

Stored packed two codes a byte, the even element in the high nibble: ``(ceil(n/2), 1)`` uint8.

LLM.int8::

    CB     (out, in)  int8     round(W * 127 / SCB[r]) (W rounded to float16 first, as bitsandbytes)
    SCB    (out,)     float32  row absolute maxima
    outlier_idx    (k,)      int64    input columns kept in 16-bit (from calibration), may be empty
    outlier_weight (out, k)  float16  those columns of the original W
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.codebooks import code4, dynamic_map
from lowbit.core.dtypes import DataTypeScheme

INV_127 = 7.874015718698502e-3  # 1/127 as a float32, the constant bitsandbytes multiplies by


@dataclass
class Blockwise4bitWeight:
    codes: torch.Tensor
    scheme: DataTypeScheme
    absmax: torch.Tensor | None = None
    qabsmax: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    dtype: torch.dtype = torch.bfloat16  # the dtype the weight had (bitsandbytes' quant_state.dtype)

    def __post_init__(self) -> None:
        n = self.codes.numel()
        blocks = -(-n // (self.scheme.block_size or 64))
        if self.scheme.double_quant:
            if self.qabsmax is None or self.absmax2 is None or self.offset is None:
                raise ValueError("double quantization needs qabsmax, absmax2 and offset")
            if self.qabsmax.shape != (blocks,) or self.absmax2.shape != (-(-blocks // 256),):
                raise ValueError(f"qabsmax {tuple(self.qabsmax.shape)} / absmax2 {tuple(self.absmax2.shape)} "
                                 f"do not fit {blocks} blocks")
        elif self.absmax is None or self.absmax.shape != (blocks,):
            raise ValueError(f"absmax must have shape ({blocks},)")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block ``(B,)`` (rebuilt from the 8-bit values with double quant)."""
        if not self.scheme.double_quant:
            assert self.absmax is not None
            return self.absmax.to(torch.float32)
        assert self.qabsmax is not None and self.absmax2 is not None and self.offset is not None
        code2 = dynamic_map(self.qabsmax.device)
        vals = code2[self.qabsmax.long()]
        n, rem = vals.numel(), vals.numel() % 256
        full = n - rem
        out = torch.empty_like(vals)
        out[:full] = (vals[:full].view(-1, 256) * self.absmax2[: full // 256, None]).reshape(-1)
        if rem:
            out[full:] = vals[full:] * self.absmax2[-1]
        return out + self.offset.to(torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat (out, in)``: fp32 product, rounded through the original dtype, then ``dtype``."""
        bs = self.scheme.block_size or 64
        code = code4(self.scheme.dtype, self.codes.device)
        vals = code[self.codes.reshape(-1).long()]
        am = self.block_absmax()
        n = vals.numel()
        full = n - n % bs
        out = torch.empty_like(vals)
        out[:full] = (vals[:full].view(-1, bs) * am[: full // bs, None]).reshape(-1)
        if full < n:
            out[full:] = vals[full:] * am[-1]
        return out.view(self.shape).to(self.dtype).to(dtype)

    def packed(self) -> torch.Tensor:
        """bitsandbytes' storage: two codes a byte, even element high, ``(ceil(n/2), 1)`` uint8."""
        flat = self.codes.reshape(-1).to(torch.uint8)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)

    @staticmethod
    def unpack(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`packed`: codes ``(out, in)`` uint8."""
        p = packed.reshape(-1).view(torch.uint8)
        codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)
        return codes[: shape[0] * shape[1]].view(shape).contiguous()

    def to(self, device: torch.device | str) -> Blockwise4bitWeight:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Blockwise4bitWeight(self.codes.to(device), self.scheme, mv(self.absmax), mv(self.qabsmax),
                                   mv(self.absmax2), mv(self.offset), self.dtype)


@dataclass
class Int8Weight:
    CB: torch.Tensor
    SCB: torch.Tensor
    scheme: DataTypeScheme
    outlier_idx: torch.Tensor | None = None
    outlier_weight: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.CB.shape[0]), int(self.CB.shape[1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``CB * SCB / 127`` (as bitsandbytes' ``int8_vectorwise_dequant``), outlier columns exact."""
        w = self.CB.to(torch.float32) * self.SCB.to(torch.float32)[:, None] * INV_127
        if self.outlier_idx is not None and self.outlier_weight is not None and self.outlier_idx.numel():
            w[:, self.outlier_idx] = self.outlier_weight.to(torch.float32)
        return w.to(dtype)

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.CB.to(device), self.SCB.to(device), self.scheme,
                          None if self.outlier_idx is None else self.outlier_idx.to(device),
                          None if self.outlier_weight is None else self.outlier_weight.to(device))
