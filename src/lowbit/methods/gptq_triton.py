"""The GPTQ column loop of static-group layers as one Triton kernel per block of columns.

Rows of ``W`` are independent in GPTQ: row ``r`` only ever reads its own weights, its own group
parameters and the shared factor ``U``. So a program owns ``BR`` rows and runs, for the ``B``
columns of a block, entirely in registers::

    for i in block:                                   W1 (BR, B) in registers
        q_i  = clamp(rint(w_i / s_{g(i)}) + z_{g(i)}, 0, qmax)
        e_i  = (w_i - s (q_i - z)) / U[i, i]
        W1  -= e_i U[i, block]                        (U upper: zero left of i)

then writes the codes (uint8), the scaled errors ``E (rows, B)`` and the row losses
``sum e_i^2 / 2``. The rest of the layer gets the block's error in one fp32 GEMM,
``W[:, after] -= E U[block, after]`` (the lazy batch update of the paper). A 128-column block is
one kernel launch instead of ~1500 small ones (the launch-bound eager loop or its CUDA-graph
replay). Divisions are IEEE round-to-nearest and rounding is half-to-even, as in the eager loop;
fused multiply-adds may differ from it in the last bit, so near-ties can round the other way.

Shapes: ``W (rows, cols)`` float32 (updated in place), ``U (cols, cols)`` float32 upper,
``scales / zeros (rows, G)`` float32, ``col_group (cols,)`` int32 group of each processed column.
"""

from __future__ import annotations

import torch

try:  # optional: Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False


def available(t: torch.Tensor) -> bool:
    """Whether the Triton path can run on ``t``'s device."""
    return HAVE_TRITON and t.device.type == "cuda"


if HAVE_TRITON:

    @triton.jit
    def _rint(x):  # pragma: no cover - round half to even (torch.round), exact for |x| < 2^22
        t = tl.floor(x)
        d = x - t
        odd = (t - 2.0 * tl.floor(t * 0.5)) == 1.0
        return tl.where(d > 0.5, t + 1.0, tl.where(d < 0.5, t, tl.where(odd, t + 1.0, t)))

    @triton.jit
    def _gptq_block_kernel(W, sw, U, su, S, Z, ss, G, Q, sq, E, L, rows, qmax,
                           ncols: tl.constexpr, B: tl.constexpr, BR: tl.constexpr):  # pragma: no cover - runs on GPUs
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.arange(0, B)
        rm = r < rows
        cm = c < ncols
        m2 = rm[:, None] & cm[None, :]
        w = tl.load(W + r[:, None] * sw + c[None, :], mask=m2, other=0.0)
        qt = tl.zeros([BR, B], dtype=tl.float32)
        et = tl.zeros([BR, B], dtype=tl.float32)
        for i in range(ncols):
            sel = c[None, :] == i
            wi = tl.sum(tl.where(sel, w, 0.0), axis=1)
            g = tl.load(G + i)
            s = tl.load(S + r * ss + g, mask=rm, other=1.0)
            z = tl.load(Z + r * ss + g, mask=rm, other=0.0)
            q = _rint(tl.math.div_rn(wi, s)) + z
            q = tl.minimum(tl.maximum(q, 0.0), qmax)
            d = tl.load(U + i * su + i)
            err = tl.math.div_rn(wi - s * (q - z), d)
            u = tl.load(U + i * su + c, mask=cm & (c >= i), other=0.0)
            w = w - err[:, None] * u[None, :]
            qt = tl.where(sel, q[:, None], qt)
            et = tl.where(sel, err[:, None], et)
        tl.store(Q + r[:, None] * sq + c[None, :], qt.to(tl.uint8), mask=m2)
        tl.store(E + r[:, None] * B + c[None, :], et, mask=m2)
        loss = tl.sum(et * et, axis=1) * 0.5
        tl.store(L + r, tl.load(L + r, mask=rm, other=0.0) + loss, mask=rm)


def static_columns(W: torch.Tensor, U: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   col_group: torch.Tensor, qmax: int, block_size: int = 128, rows_per_program: int = 16
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ over every column of ``W`` (in processing order) with fixed per-group parameters.

    Returns ``(codes (rows, cols) uint8, row losses (rows,) float32)``; ``W`` is consumed.
    """
    if not available(W):
        raise RuntimeError("the Triton GPTQ kernel needs a CUDA tensor and the triton package")
    rows, cols = W.shape
    B = block_size
    W = W.contiguous()
    U = U.contiguous()
    S = scales.to(torch.float32).contiguous()
    Z = zeros.to(torch.float32).contiguous()
    G = col_group.to(device=W.device, dtype=torch.int32).contiguous()
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    E = torch.empty(rows, B, dtype=torch.float32, device=W.device)
    losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    grid = (triton.cdiv(rows, rows_per_program),)
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        n = i2 - i1
        _gptq_block_kernel[grid](W[:, i1:], W.stride(0), U[i1:, i1:], U.stride(0), S, Z, S.stride(0),
                                 G[i1:], codes[:, i1:], codes.stride(0), E, losses, rows, float(qmax),
                                 ncols=n, B=B, BR=rows_per_program, num_warps=4)
        if i2 < cols:
            W[:, i2:].addmm_(E[:, :n], U[i1:i2, i2:], alpha=-1.0)
    return codes, losses
