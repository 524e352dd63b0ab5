"""AWQ: activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Gan, Han; MLSys 2024).

Salient input channels (large ``E|x_j|``) lose less to rounding when they are scaled up before
quantization and the inverse scale is folded into what feeds them. For a group of linears
``W_i (out_i, in)`` sharing an input ``X (N, in)``::

    s(alpha) = xbar^alpha / wbar^(1 - alpha)     (duo scaling; xbar^alpha when it is off; "both" tries both)
    s       <- s / sqrt(max(s) * min(s))          (centred around 1)
    L(alpha) = || P(X; {W_i}) - P(X; {Q(W_i * s) / s}) ||^2

with ``xbar_j = mean_t |X_tj|``, ``wbar_j = mean_r |W_rj| / max_{k in group(j)} |W_rk|`` (weights
normalised per quantization group), ``Q`` the weight quantizer, and ``P`` the output the loss
looks at: by default the smallest module holding the whole group (the attention for q/k/v, the
MLP for gate/up, the linear itself for o and down), as llm-compressor and AutoAWQ do, so errors
count as much as they move what the block passes on; :func:`linear_loss` is the cheaper sum of
the linears' own output errors, ``sum_i ||X W_i^T - X (Q(W_i s)/s)^T||^2``. Since
``(X / s) Q(W s)^T = X (Q(W s) / s)^T``, a candidate is scored by swapping in the effective
weights ``Q(W_i s) / s``, nothing folded. ``alpha`` runs over ``grid`` points of [0, 1]; the
identity (``s = 1``, plain RTN) is always a candidate, so the search never loses to it.

Clipping (AutoAWQ's ``auto_clip``): per output row ``r`` and group ``g`` the range is shrunk to
``m = (1 - k / grid) * max|W_rg|``, ``k < max_shrink * grid``, keeping the ``m`` that minimises
``sum_t (X_tg . W_rg - X_tg . Q(clamp(W_rg, -m, m)))^2`` over a token sample.

These are pure functions of weights and statistics; :mod:`lowbit.pipeline.awq` runs them block by
block, folds the scales (:mod:`lowbit.pipeline.scaling`) and clamps the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import fake_quantize

FakeQuant = Callable[[torch.Tensor], torch.Tensor]


def fake_quant(scheme: QuantScheme, scale_dtype: torch.dtype = torch.bfloat16) -> FakeQuant:
    """``W -> Q(W)`` (dequantized, same dtype) with plain min/max RTN of ``scheme``."""
    def q(w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, scheme, scale_dtype)
    return q


def weight_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """``wbar (in,)``: mean over all rows of ``|W|`` normalised by each row-group's absmax."""
    rows = torch.cat([w.detach().to(torch.float32) for w in weights], dim=0)
    out, inp = rows.shape
    gs = group_size or inp
    g = rows.abs().view(out, inp // gs, gs)
    g = g / g.amax(dim=2, keepdim=True).clamp(min=1e-8)
    return g.view(out, inp).mean(dim=0)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``s (in,)`` for one ``alpha`` (module docstring); ``w_mean=None`` is AutoAWQ's x-only form."""
    x = x_mean.to(torch.float32).clamp(min=1e-6)
    if w_mean is None:
        s = x.pow(alpha)
    else:
        s = x.pow(alpha) / (w_mean.to(torch.float32).pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


Loss = Callable[[list[torch.Tensor]], float]


def linear_loss(x: torch.Tensor, weights: list[torch.Tensor]) -> Loss:
    """``L(W') = sum_i ||x W_i^T - x W'_i^T||^2`` on input rows ``x (N, in)``."""
    xf = x.to(torch.float32)
    ref = [xf @ w.to(torch.float32).t() for w in weights]

    def loss(eff: list[torch.Tensor]) -> float:
        return sum(float((y - xf @ w.t()).square().sum()) for y, w in zip(ref, eff, strict=True))
    return loss


@torch.no_grad()
def search_scales(x_mean: torch.Tensor, weights: list[torch.Tensor], quant: FakeQuant, group_size: int | None,
                  loss: Loss, grid: int = 20, duo: bool | str = True) -> tuple[torch.Tensor, float, float]:
    """Best ``s (in,)`` over the alpha grid for the group's ``weights``, scored by ``loss``.

    ``loss`` takes the effective fp32 weights ``Q(W_i s) / s`` (one per linear, in order) and
    returns the error they cause. ``duo`` True scores ``xbar^a / wbar^(1-a)``, False ``xbar^a``,
    ``"both"`` scores both grids (llm-compressor's ``duo_scaling="both"``). Returns
    ``(s, alpha, loss / identity loss)``; alpha is -1 when the identity won.
    """
    if duo not in (True, False, "both"):
        raise ValueError(f"duo must be True, False or 'both', got {duo!r}")
    wf = [w.to(torch.float32) for w in weights]
    w_mean = weight_mean(weights, group_size) if duo else None
    base = loss([quant(w) for w in wf])
    best, best_alpha, best_s = base, -1.0, torch.ones_like(x_mean, dtype=torch.float32)
    means = [w_mean, None] if duo == "both" else [w_mean]
    for k in range(grid):
        alpha = k / max(grid - 1, 1)
        for wm in means:
            if wm is None and duo == "both" and k == 0:
                continue  # xbar^0 = 1: the identity, already scored
            s = awq_scales(x_mean, wm, alpha).to(wf[0].device)
            cur = loss([quant(w * s) / s for w in wf])
            if cur < best:
                best, best_alpha, best_s = cur, alpha, s
    return best_s, best_alpha, best / max(base, 1e-30)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, quant: FakeQuant, group_size: int | None, grid: int = 20,
                max_shrink: float = 0.5, row_batch: int = 256) -> torch.Tensor:
    """Per (row, group) clipping magnitude ``m (out, G)`` for ``w (out, in)`` on inputs ``x (N, in)``."""
    out, inp = w.shape
    gs = group_size or inp
    G = inp // gs
    wf = w.to(torch.float32)
    xg = x.to(torch.float32).view(-1, G, gs)  # (N, G, gs)
    best_m = torch.empty(out, G, dtype=torch.float32, device=w.device)
    for r0 in range(0, out, row_batch):
        wb = wf[r0:r0 + row_batch]
        rows = wb.shape[0]
        wbg = wb.view(rows, G, gs)
        org_max = wbg.abs().amax(dim=2)  # (rows, G)
        ref = torch.einsum("ngk,rgk->nrg", xg, wbg)  # (N, rows, G)
        best_err = torch.full((rows, G), float("inf"), device=w.device)
        bm = org_max.clone()
        for k in range(int(max_shrink * grid)):
            m = org_max * (1 - k / grid)
            clipped = torch.maximum(torch.minimum(wbg, m[..., None]), -m[..., None]).reshape(rows, inp)
            q = quant(clipped).view(rows, G, gs)
            err = (torch.einsum("ngk,rgk->nrg", xg, q) - ref).square().mean(dim=0)  # (rows, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            bm = torch.where(better, m, bm)
        best_m[r0:r0 + rows] = bm
    return best_m


def apply_clip(w: torch.Tensor, m: torch.Tensor) -> None:
    """Clamp ``w (out, in)`` in place to ``[-m, m]`` per (row, group) (``m (out, G)``)."""
    out, inp = w.shape
    G = m.shape[1]
    wg = w.data.view(out, G, inp // G)
    mm = m.to(device=w.device, dtype=w.dtype)[..., None]
    torch.maximum(torch.minimum(wg, mm), -mm, out=wg)
