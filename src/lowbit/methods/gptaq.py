"""Asymmetric calibration for GPTQ: aim the quantized layer at the *float* model's output.

Li et al., "GPTAQ (GPTQv2): Efficient Finetuning-Free Quantization for Asymmetric Calibration"
(ICML 2025). Plain GPTQ fits ``W_hat`` to the layer's output on the inputs it sees in the
partly-quantized model, ``X~ (n, in)``: ``min ||X~ W_hat^T - X~ W^T||^2``, so the error earlier
layers left in ``X~`` is never corrected. Asymmetric calibration fits the float model's output on
the float inputs ``X`` instead::

    L(v) = ||X~ v^T - X w^T||^2                          (one row v of W_hat, w of W)
         = (v - v*) H (v - v*)^T + const,   H = X~^T X~,
    v*   = w X^T X~ H^-1 = w (I + D H^-1),  D = (X - X~)^T X~   (in, in)

so the loss is GPTQ's quadratic with the target ``v*`` in place of ``w``: running GPTQ (same ``H``,
same error feedback) on ``W* = W + alpha W D H^-1`` is the greedy OBS solution of the
asymmetric objective at ``alpha = 1``. GPTAQ's column-wise form applies the same correction as
the columns are quantized, tempered by ``alpha`` (0.25 in its code) because ``D H^-1`` is a
least-squares fit to a finite calibration set; ``alpha`` plays that role here.

``H`` is damped like GPTQ's (``damp * mean(diag H)`` on the diagonal) for the solve. Inside GPTQ
(:func:`shift_with_factor_`) ``H^-1`` comes from GPTQ's own factor ``H^-1 = U^T U`` (upper ``U``, in
act-order if any), so the shift costs two matmuls per row band and no second factorisation or
``in x in`` copy; :func:`asymmetric_target_` is the standalone form with a Cholesky of its own.
On CUDA these products run in TF32 (10-bit mantissa, fp32 range and sums): they form a
correction that is a small part of ``W``, so their ~1e-3 relative rounding stays far below a
quantization step, at several times the fp32 rate.
Shapes: ``W (out, in)``, ``H``, ``D``, ``U (in, in)`` float32 (``H``, ``D`` scaled by the same ``2/n``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lowbit.core.errors import SchemeError


def asymmetric_target_(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, alpha: float, damp: float,
                       tries: int = 8, rows: int = 4096) -> torch.Tensor:
    """``W += alpha (W D) H^-1`` in place, ``rows`` rows at a time; returns ``W``.

    ``H^-1`` is applied through the Cholesky factor of the damped ``H`` (damping raised x10 when
    the factorisation fails, as GPTQ does); dead columns (``H_jj = 0``) get ``H_jj = 1``.
    """
    diag = H.diagonal()
    mean_diag = float(torch.where(diag == 0, torch.ones_like(diag), diag).mean())
    for attempt in range(tries):
        Hd = H.clone()
        Hd.diagonal()[diag == 0] = 1.0
        Hd.diagonal().add_(damp * 10**attempt * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            break
    else:
        raise SchemeError("asymmetric calibration: the Hessian stays singular; use more calibration samples")
    for r0 in range(0, W.shape[0], rows):
        Wr = W[r0:r0 + rows]
        M = Wr @ D  # (rows, in)
        Wr.add_(torch.cholesky_solve(M.T, L).T, alpha=alpha)  # H^-1 symmetric: (M H^-1)^T = H^-1 M^T
    return W


@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    """float32 CUDA matmuls in TF32 inside the block (restored after)."""
    m = torch.backends.cuda.matmul
    old = m.fp32_precision
    m.fp32_precision = "tf32"
    try:
        yield
    finally:
        m.fp32_precision = old


def cross_product(W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``W D (out, in)`` in float32 (TF32 on CUDA) for :func:`shift_with_factor_`."""
    with _tf32():
        return W.float() @ D.to(device=W.device, dtype=torch.float32)


def shift_with_factor_(W: torch.Tensor, WD: torch.Tensor, U: torch.Tensor, alpha: float,
                       perm: torch.Tensor | None = None, rows: int = 4096) -> torch.Tensor:
    """``W += alpha (W D) H^-1`` in place given ``WD = W D (out, in)`` and GPTQ's factor ``U`` of the
    damped ``H^-1``; returns ``W``.

    ``U (in, in)`` is upper with ``U^T U = (P H P^T + lambda I)^-1`` for the act-order permutation
    ``P`` (``perm``: processing position -> original column; None for the identity). ``W`` and
    ``WD`` are in the original column order; for a row band ``M`` of ``WD``:
    ``M H^-1 = ((M P^T) U^T U) P``, i.e. permute the columns, apply ``U^T`` then ``U``, permute back.
    ``WD`` is taken rather than ``D`` so that the caller can free the ``in x in`` ``D`` before GPTQ
    runs. Peak extra memory: two ``(rows, in)`` float32 bands.
    """
    inv = None if perm is None else torch.argsort(perm)
    with _tf32():
        for r0 in range(0, W.shape[0], rows):
            M = WD[r0:r0 + rows].to(device=W.device, dtype=torch.float32)  # (rows, in), original order
            if perm is not None:
                M = M[:, perm]
            M = (M @ U.mT) @ U  # v H_p^-1 = (v U^T) U for row vectors v
            if inv is not None:
                M = M[:, inv]
            W[r0:r0 + rows].add_(M, alpha=alpha)
    return W
