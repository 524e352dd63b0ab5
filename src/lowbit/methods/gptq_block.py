"""The inner GPTQ loop over the columns of one block, eager or replayed from a CUDA graph.

For a block of ``B`` columns (``W1 (rows, B)``, the block ``U1 (B, B)`` of the upper Cholesky
factor of ``H^-1``, and per-column scale / zero point ``(rows, B)`` already gathered from the
static groups) every column ``i`` is quantized and its error spread over the columns after it::

    q_i  = clamp(round(w_i / s_i) + z_i, 0, qmax)
    e_i  = (w_i - s_i (q_i - z_i)) / U1[i, i]
    W1[:, i:] -= e_i U1[i, i:]

That is ``B`` rank-1 updates of about a dozen small kernels each: on a GPU the launch overhead,
not arithmetic, sets the time. With static groups every shape and address is fixed, so the whole
loop is captured once as a CUDA graph per ``(rows, B)`` and replayed for every block of every
layer of that shape (inputs copied into the graph's buffers, outputs copied out).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def block_columns(W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
                  Q1: torch.Tensor, Err1: torch.Tensor) -> None:
    """Quantize the columns of ``W1 (rows, B)`` in place of ``Q1`` (codes) and ``Err1`` (scaled errors)."""
    for i in range(W1.shape[1]):
        w = W1[:, i]
        s, z = scale[:, i], zero[:, i]
        q = torch.clamp(torch.round(w / s) + z, 0, qmax)
        Q1[:, i] = q
        err = (w - s * (q - z)) / U1[i, i]
        Err1[:, i] = err
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)


class _Graphed:
    """One captured :func:`block_columns` for fixed ``(rows, B)``, with its static buffers."""

    def __init__(self, rows: int, cols: int, qmax: int, device: torch.device) -> None:
        def buf(fill: float) -> torch.Tensor:
            return torch.full((rows, cols), fill, device=device, dtype=torch.float32)

        self.W1, self.scale, self.zero, self.Q1, self.Err1 = buf(0), buf(1), buf(0), buf(0), buf(0)
        self.U1 = torch.eye(cols, device=device, dtype=torch.float32)
        args = (self.W1, self.U1, self.scale, self.zero, qmax, self.Q1, self.Err1)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            block_columns(*args)  # warm-up outside the capture, as CUDA graphs require
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            block_columns(*args)

    def __call__(self, W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 Q1: torch.Tensor, Err1: torch.Tensor) -> None:
        self.W1.copy_(W1)
        self.U1.copy_(U1)
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        self.graph.replay()
        Q1.copy_(self.Q1)
        Err1.copy_(self.Err1)
        W1.copy_(self.W1)


_GRAPHS: dict[tuple[int, int, int, str], _Graphed] = {}
_MAX_GRAPHS = 16
_BROKEN: set[str] = set()  # devices where capture failed: eager from then on


def run_block_columns(W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
                      Q1: torch.Tensor, Err1: torch.Tensor, graphs: bool = True) -> None:
    """:func:`block_columns`, through a cached CUDA graph when ``W1`` is on a GPU and ``graphs``."""
    if not graphs or W1.device.type != "cuda" or str(W1.device) in _BROKEN:
        block_columns(W1, U1, scale, zero, qmax, Q1, Err1)
        return
    key = (W1.shape[0], W1.shape[1], qmax, str(W1.device))
    g = _GRAPHS.get(key)
    if g is None:
        if len(_GRAPHS) >= _MAX_GRAPHS:
            _GRAPHS.clear()
        try:
            g = _GRAPHS[key] = _Graphed(W1.shape[0], W1.shape[1], qmax, W1.device)
        except RuntimeError as e:  # e.g. a capture-unsafe allocator setting: stay correct, run eagerly
            log.warning("CUDA graph capture of the GPTQ column loop failed (%s); running it eagerly", e)
            _BROKEN.add(str(W1.device))
            block_columns(W1, U1, scale, zero, qmax, Q1, Err1)
            return
    g(W1, U1, scale, zero, Q1, Err1)
