"""Bit packing of unsigned integer codes into int32 words.

Layout (compressed-tensors ``pack-quantized``, dense cross-element packing): along the packed
dimension, element ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of a little-endian bit stream,
least significant bit first; word ``k`` holds stream bits ``[32k, 32k+32)``. 32 consecutive
elements of ``b`` bits fill exactly ``b`` words, so a row of ``n`` elements takes
``ceil(n*b / 32)`` words (the stream is zero-padded to a multiple of 32 elements first)::

    b = 4:  word 0 = e0 | e1<<4 | e2<<8 | ... | e7<<28           (8 elements a word, no straddling)
    b = 3:  word 0 = e0 | e1<<3 | ... | e9<<27 | (e10 & 0b11)<<30, word 1 = e10>>2 | e11<<1 | ...

Codes here are *unsigned* (``0 .. 2^b - 1``). compressed-tensors stores signed values offset by
``2^(b-1)`` before packing, which gives the same words.
"""

from __future__ import annotations

import math

import torch


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` elements of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def _placements(bits: int) -> list[tuple[int, int, int, int]]:
    """For element ``p`` of a 32-element chunk: ``(p, word, shift, spill)``: its low bits go to ``word`` at
    ``shift``; ``spill`` > 0 of its high bits continue at bit 0 of ``word + 1``."""
    out = []
    for p in range(32):
        start = p * bits
        word, shift = divmod(start, 32)
        out.append((p, word, shift, max(0, shift + bits - 32)))
    return out


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack unsigned codes ``(rows, cols)`` into int32 along ``dim`` (1: columns, 0: rows).

    Returns ``(rows, ceil(cols*bits/32))`` for ``dim=1`` or ``(ceil(rows*bits/32), cols)`` for ``dim=0``.
    Each of the 32 element positions of a chunk is or-ed into its word(s) in turn, so the temporaries are
    one int64 per chunk and word (a quarter of the codes' int64 size at 4 bits), never one per bit.
    """
    if codes.ndim != 2:
        raise ValueError(f"pack_int32 expects a 2-D tensor, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    x = codes if dim == 1 else codes.t()
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >> bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(x.min())}, {int(x.max())}]")
    rows, cols = x.shape
    pad = (-cols) % 32
    x = x.to(torch.int64)
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    chunks = x.shape[1] // 32
    if 32 % bits == 0:  # 1, 2, 4, 8 bits: whole elements per word, one shift-and-sum
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=x.device)
        words = (x.view(rows, chunks * bits, per) << shifts).sum(-1)
        words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
        out = words[:, : packed_words(cols, bits)]
        return (out.t() if dim == 0 else out).contiguous()
    xc = x.view(rows, chunks, 32)
    words = torch.zeros(rows, chunks, bits, dtype=torch.int64, device=x.device)
    for p, word, shift, spill in _placements(bits):
        e = xc[:, :, p]
        words[:, :, word] |= (e << shift) & 0xFFFFFFFF
        if spill:
            words[:, :, word + 1] |= e >> (bits - spill)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    out = words.view(rows, chunks * bits)[:, : packed_words(cols, bits)]
    return (out.t() if dim == 0 else out).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``n`` elements along ``dim``, returned as uint8 codes."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    w = packed.t() if dim == 0 else packed
    rows, nwords = w.shape
    if nwords != packed_words(n, bits):
        raise ValueError(f"{nwords} words cannot hold exactly {n} elements of {bits} bits")
    w = w.to(torch.int64) & 0xFFFFFFFF
    pad = (-nwords) % bits
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    chunks = w.shape[1] // bits
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=w.device)
        full = ((w.unsqueeze(-1) >> shifts) & mask).to(torch.uint8).reshape(rows, chunks * 32)[:, :n]
        return (full.t() if dim == 0 else full).contiguous()
    wc = w.view(rows, chunks, bits)
    codes = torch.empty(rows, chunks, 32, dtype=torch.uint8, device=w.device)
    for p, word, shift, spill in _placements(bits):
        e = wc[:, :, word] >> shift
        if spill:
            e = e | (wc[:, :, word + 1] << (bits - spill))
        codes[:, :, p] = (e & mask).to(torch.uint8)
    out = codes.view(rows, chunks * 32)[:, :n]
    return (out.t() if dim == 0 else out).contiguous()
