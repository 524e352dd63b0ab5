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


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack unsigned codes ``(rows, cols)`` into int32 along ``dim`` (1: columns, 0: rows).

    Returns ``(rows, ceil(cols*bits/32))`` for ``dim=1`` or ``(ceil(rows*bits/32), cols)`` for ``dim=0``.
    """
    if codes.ndim != 2:
        raise ValueError(f"pack_int32 expects a 2-D tensor, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    x = codes.to(torch.int64)
    if dim == 0:
        x = x.t().contiguous()
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >> bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(x.min())}, {int(x.max())}]")
    rows, cols = x.shape
    pad = (-cols) % 32
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    chunks = x.shape[1] // 32
    # bit j of element i -> stream position i*bits + j
    shifts = torch.arange(bits, dtype=torch.int64, device=x.device)
    stream = ((x.view(rows, chunks, 32, 1) >> shifts) & 1).view(rows, chunks, bits, 32)
    weights = torch.ones(32, dtype=torch.int64, device=x.device) << torch.arange(32, device=x.device)
    words = (stream * weights).sum(-1)  # (rows, chunks, bits) in [0, 2^32)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    out = words.view(rows, chunks * bits)[:, : packed_words(cols, bits)]
    return (out.t() if dim == 0 else out).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``n`` elements along ``dim``, returned as uint8 codes."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    w = (packed.t() if dim == 0 else packed).contiguous()
    rows, nwords = w.shape
    if nwords != packed_words(n, bits):
        raise ValueError(f"{nwords} words cannot hold exactly {n} elements of {bits} bits")
    w = w.to(torch.int64) & 0xFFFFFFFF
    pad = (-nwords) % bits
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    chunks = w.shape[1] // bits
    t = torch.arange(32, dtype=torch.int64, device=w.device)
    stream = ((w.view(rows, chunks, bits, 1) >> t) & 1).view(rows, chunks, 32, bits)
    weights = torch.ones(bits, dtype=torch.int64, device=w.device) << torch.arange(bits, device=w.device)
    codes = (stream * weights).sum(-1).view(rows, chunks * 32)[:, :n].to(torch.uint8)
    return (codes.t() if dim == 0 else codes).contiguous()
