"""NF4 and FP4 block-wise quantization (QLoRA: Dettmers, Pagnoni, Holtzman, Zettlemoyer, 2023).

For ``W (out, in)`` flattened row-major into blocks of ``block_size`` values::

    a_b   = max_{i in b} |w_i|                                    (block absmax, float32)
    x_i   = clamp(w_i * (1 / a_b), -1, 1)
    q_i   = argmin_k |x_i - code[k]|   (bucketize on the sorted midpoints; ties go down)

Double quantization (``double_quant``) stores the absmax values in 8 bits: ``offset = mean(a)``,
then ``a - offset`` in blocks of 256 is quantized to bitsandbytes' dynamic map with the same
absmax scheme. bitsandbytes' CPU kernel rounds through a 65536-entry lookup table; it is
reproduced exactly here (:func:`quantize_blockwise_8bit`), so codes, absmax values and packed bytes
equal ``bitsandbytes.functional.quantize_4bit`` on the same input, bit for bit (tested).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lowbit.core.blockwise import Blockwise4bitWeight
from lowbit.core.codebooks import code4, dynamic_map
from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import SchemeError

_LUT_SIZE = 65536


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``x`` flattened (float32), zero-padded to whole blocks ``(B, block)``; its block absmax ``(B,)``; n."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = -(-n // block)
    padded = F.pad(flat, (0, blocks * block - n)).view(blocks, block)
    return padded, padded.abs().amax(dim=1), n


def quantize_4bit_codes(weight: torch.Tensor, kind: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(out, in)`` uint8 (storage index order) and absmax ``(B,)`` float32 of ``weight``."""
    code = code4(kind, weight.device)
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    blocks, absmax, n = _blocks(weight, block_size)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    q = torch.bucketize(scaled, mids, out_int32=True)
    q = order[q.long()] if kind != "nf4" else q
    return q.to(torch.uint8).view(weight.shape), absmax


@functools.lru_cache(maxsize=8)
def _lut(code: tuple[float, ...], device: str) -> torch.Tensor:
    """The 65536-bin nearest-code table of a sorted code book (see :func:`quantize_blockwise_8bit`)."""
    c = torch.tensor(code, dtype=torch.float32, device=device)
    mids = 0.5 * (c[:-1] + c[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / (_LUT_SIZE - 1)
    return torch.searchsorted(mids.contiguous(), grid, right=False).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, block_size: int = 256
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit block-wise quantization to a sorted 256-entry ``code``, as bitsandbytes' CPU kernel does.

    Per block ``a = max|x|``, ``v = clamp(x * (1/a), -1, 1)``, then a lookup table of 65536 bins:
    ``idx = trunc((v + 1) * 0.5 * 65535 + 0.5)`` and ``lut[i]`` = the number of code midpoints
    below ``-1 + 2 i / 65535`` (all float32). Returns codes ``x.shape`` uint8 and absmax ``(B,)``.
    """
    lut = _lut(tuple(code.tolist()), str(x.device))
    blocks, absmax, n = _blocks(x, block_size)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    v = (blocks * inv[:, None]).reshape(-1)[:n].clamp(-1, 1)
    idx = ((v + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = lut[idx]
    q = torch.where((absmax == 0).repeat_interleave(block_size)[:n], torch.zeros_like(q), q)
    return q.view(x.shape), absmax


def quantize_4bit(weight: torch.Tensor, scheme: DataTypeScheme, dtype: torch.dtype | None = None
                  ) -> Blockwise4bitWeight:
    """Quantize ``weight (out, in)`` (any float dtype) to NF4/FP4 per ``scheme``.

    ``dtype`` is the dtype the dequantized weight is rounded through (bitsandbytes keeps the
    dtype the weight had; pass the checkpoint's when ``weight`` was upcast for computing).
    """
    if scheme.dtype not in ("nf4", "fp4"):
        raise SchemeError(f"quantize_4bit handles nf4/fp4, not {scheme.dtype}")
    if weight.dim() != 2:
        raise SchemeError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    bs = scheme.block_size or 64
    codes, absmax = quantize_4bit_codes(weight, scheme.dtype, bs)
    if dtype is None:
        dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if not scheme.double_quant:
        return Blockwise4bitWeight(codes, scheme, absmax=absmax, dtype=dtype)
    offset = absmax.mean()
    qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, dynamic_map(weight.device), 256)
    return Blockwise4bitWeight(codes, scheme, qabsmax=qabsmax, absmax2=absmax2, offset=offset, dtype=dtype)
