"""In-place permutations of large matrices with small temporaries.

``M[:, perm]`` or ``H[perm][:, perm]`` in torch build a full-size result next to the source; for
a GPTQ Hessian of a 14336-wide input that is 0.8 GB more GPU memory than the method needs. Here:

* columns are permuted a band of rows at a time (temporary: one band);
* a square matrix is transposed in place by swapping tile pairs (temporary: one tile);
* a symmetric ``H`` becomes ``P H P^T`` by permuting columns (``B = H P^T``), transposing
  (``B^T = P H``, by symmetry) and permuting columns again (``P H P^T``).
"""

from __future__ import annotations

import torch

_BAND_ELEMENTS = 1 << 24  # elements per temporary band or tile (64 MB in float32)


def permute_columns_(M: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``M[:, :] = M[:, perm]`` in place, for ``M (rows, cols)`` and ``perm (cols,)``."""
    rows = max(1, _BAND_ELEMENTS // max(M.shape[1], 1))
    for r0 in range(0, M.shape[0], rows):
        band = M[r0 : r0 + rows]
        band.copy_(band[:, perm])
    return M


def transpose_(M: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """``M = M^T`` in place for a square ``M (n, n)``."""
    n = M.shape[0]
    if M.shape != (n, n):
        raise ValueError(f"transpose_ needs a square matrix, got {tuple(M.shape)}")
    for i in range(0, n, tile):
        d = M[i : i + tile, i : i + tile]
        d.copy_(d.T.clone())
        for j in range(i + tile, n, tile):
            a, b = M[i : i + tile, j : j + tile], M[j : j + tile, i : i + tile]
            t = a.clone()
            a.copy_(b.T)
            b.copy_(t.T)
    return M


def permute_symmetric_(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``H = H[perm][:, perm]`` in place for a symmetric ``H (n, n)``."""
    permute_columns_(H, perm)
    transpose_(H)
    return permute_columns_(H, perm)
