"""Refit the group scales of a GPTQ result to the layer's output error, codes held fixed.

GPTQ picks the codes ``q`` with fixed group scales (fitted on the original weights before any
error feedback). Once the codes are known, the output error of the layer is a quadratic in the
scales: with ``c = q - z`` (per group zero point ``z``, kept) and ``w_hat = s_g c`` on group ``g``,

    L(s) = (w - w_hat)^T H (w - w_hat)       per output row, H = 2 X^T X (in, in)

Minimising ``L`` over one group's scale with the others fixed is exact (a 1-D quadratic)::

    s_g <- s_g + c_g^T (H r)_g / (c_g^T H_gg c_g),      r = w - w_hat

Gauss-Seidel sweeps over the groups (all rows at once, ``H r`` updated by the change of one group)
never increase ``L`` before the scales are rounded to the storage dtype; the result is kept only
if the rounded scales lower the total loss. The same least-squares idea as the scale refit of
importance-weighted RTN, with the full Hessian instead of its diagonal.

Shapes: ``W (out, in)`` original weights, ``codes (out, in)``, ``scales / zeros (out, G)``,
contiguous groups of ``in / G`` columns, ``H (in, in)`` float32.
"""

from __future__ import annotations

import torch


def _loss(R: torch.Tensor, HR: torch.Tensor) -> torch.Tensor:
    return (R * HR).sum(1)  # (out,) r^T H r per row


def refit_scales(W: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 H: torch.Tensor, sweeps: int = 2, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scales ``(out, G)`` (float32 values representable in ``scale_dtype``) that lower the output
    error of the fixed ``codes``; rows whose refit would not lower it keep their old scales."""
    out, cols = W.shape
    G = scales.shape[1]
    gs = cols // G
    W = W.to(torch.float32)
    H = H.to(device=W.device, dtype=torch.float32)
    C = codes.to(torch.float32) - zeros.to(torch.float32).repeat_interleave(gs, 1)
    s0 = scales.to(torch.float32)
    s = s0.clone()
    R = W - s.repeat_interleave(gs, 1) * C
    HR = R @ H
    before = _loss(R, HR)
    for _ in range(sweeps):
        for g in range(G):
            cols_g = slice(g * gs, (g + 1) * gs)
            Cg = C[:, cols_g]
            den = ((Cg @ H[cols_g, cols_g]) * Cg).sum(1)
            num = (Cg * HR[:, cols_g]).sum(1)
            step = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
            new = (s[:, g] + step).clamp_min(1e-12).to(scale_dtype).to(torch.float32)
            dr = -(new - s[:, g]).unsqueeze(1) * Cg  # change of the residual on the group's columns
            R[:, cols_g] += dr
            HR += dr @ H[cols_g, :]
            s[:, g] = new
    after = _loss(R, HR)
    keep = (after <= before).unsqueeze(1)
    return torch.where(keep, s, s0)
