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

``H`` is damped like GPTQ's (``damp * mean(diag H)`` on the diagonal) for the solve.
Shapes: ``W (out, in)``, ``H``, ``D (in, in)`` float32 (both scaled by the same ``2/n``).
"""

from __future__ import annotations

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
