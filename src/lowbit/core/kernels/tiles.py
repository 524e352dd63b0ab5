"""Tile-interleaved packing: the layout lowbit's Triton W4A16 / W8A16 kernels read.

compressed-tensors ``pack-quantized`` stores element ``k`` of a row in word ``k // E`` at bit
``(k % E) * b`` (``E = 32 / b`` elements a word, :mod:`lowbit.core.packing`). Unpacking that in a
kernel needs a different shift for each lane. This layout instead cuts each row into tiles of
``TILE = E * T`` elements (``T = 32`` words, one 128-byte line) and interleaves within a tile::

    word  t*T + w,  slot s (bits [s*b, (s+1)*b))  holds element  k = t*TILE + s*T + w
          w in [0, T), s in [0, E)

    b = 4:  TILE = 256; slot s of the tile's 32 words = elements [32 s, 32 s + 32), in order
    b = 8:  TILE = 128

so ``(words >> s*b) & (2^b - 1)`` over a tile's ``T`` words yields ``T`` *consecutive* codes: one
shift and one mask per element, no gather, and every 32-element chunk lies inside one
quantization group when the group size is a multiple of 32. Rows are padded with code 0 to a
multiple of ``TILE`` (the kernels mask the activations there, so padding never contributes).

Shapes: ``codes (N, K)`` uint8 -> ``packed (N, ceil(K / TILE) * T)`` int32. The repack is a pure
permutation of bits: :func:`unpack_tiles` inverts it exactly.
"""

from __future__ import annotations

import torch

from lowbit.core.packing import unpack_int32

TILE_WORDS = 32  # T: words of one tile row (128 bytes)
KERNEL_BITS = (4, 8)


def tile_elems(bits: int) -> int:
    """Elements of one tile row, ``(32 / bits) * T``."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"the tile layout packs 4- or 8-bit codes, got {bits} bits")
    return (32 // bits) * TILE_WORDS


def padded_k(k: int, bits: int) -> int:
    """``K`` rounded up to a whole number of tiles."""
    t = tile_elems(bits)
    return -(-k // t) * t


def pack_tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``(N, K)`` -> tile-interleaved int32 ``(N, Kp / E)`` (see the module docstring)."""
    if codes.ndim != 2:
        raise ValueError(f"pack_tiles expects (N, K) codes, got shape {tuple(codes.shape)}")
    n, k = codes.shape
    e, kp = 32 // bits, padded_k(k, bits)
    c = torch.zeros(n, kp, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes.to(torch.int64)
    if k and int(c.max()) >> bits:
        raise ValueError(f"codes out of range for {bits} bits (max {int(c.max())})")
    c = c.view(n, kp // (e * TILE_WORDS), e, TILE_WORDS)  # (N, tiles, slot s, word w)
    shifts = (torch.arange(e, device=codes.device, dtype=torch.int64) * bits).view(1, 1, e, 1)
    words = (c << shifts).sum(2)  # slots occupy disjoint bits: the sum is an OR; (N, tiles, T) in [0, 2^32)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32).view(n, -1).contiguous()


def unpack_tiles(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_tiles`: ``(N, K)`` uint8 codes."""
    n, words = packed.shape
    e = 32 // bits
    if words % TILE_WORDS or words * e < k:
        raise ValueError(f"{words} words a row is not a whole number of {bits}-bit tiles holding {k} elements")
    w = (packed.to(torch.int64) & 0xFFFFFFFF).view(n, -1, 1, TILE_WORDS)
    shifts = (torch.arange(e, device=packed.device, dtype=torch.int64) * bits).view(1, 1, e, 1)
    codes = (w >> shifts) & ((1 << bits) - 1)  # (N, tiles, s, w)
    return codes.reshape(n, -1)[:, :k].to(torch.uint8).contiguous()


def unpack_ct(weight_packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """compressed-tensors words ``(N, ceil(K*b/32))`` -> codes ``(N, K)`` uint8, for 4 or 8 bits.

    The same codes as :func:`lowbit.core.packing.unpack_int32` (4 and 8 bits never straddle a
    word, so element ``k`` is ``(word[k // E] >> (k % E) * b) & mask``), in int32 arithmetic.
    """
    if bits not in KERNEL_BITS:
        return unpack_int32(weight_packed, bits, k, dim=1)
    e = 32 // bits
    if weight_packed.dtype != torch.int32 or weight_packed.shape[1] * e < k:
        raise ValueError(f"weight_packed must be int32 holding {k} elements of {bits} bits a row, "
                         f"got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    shifts = torch.arange(e, device=weight_packed.device, dtype=torch.int32) * bits
    codes = (weight_packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (N, words, E)
    return codes.reshape(weight_packed.shape[0], -1)[:, :k].to(torch.uint8)


def repack_ct(weight_packed: torch.Tensor, bits: int, k: int, rows: int = 2048) -> torch.Tensor:
    """compressed-tensors ``weight_packed (N, ceil(K*b/32))`` -> the tile layout, bit for bit.

    Works ``rows`` rows at a time, so the temporaries stay near ``rows * K * 8`` bytes.
    """
    parts = [pack_tiles(unpack_ct(weight_packed[r:r + rows], bits, k), bits)
             for r in range(0, weight_packed.shape[0], rows)]
    return torch.cat(parts) if len(parts) != 1 else parts[0]
