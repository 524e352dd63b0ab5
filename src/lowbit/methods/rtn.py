"""Round-to-nearest (RTN) weight quantization, with an optional clipping search that may be
weighted by the importance of each input channel (the llama.cpp importance-matrix idea).

For one group ``w`` (``gs`` weights) with scale ``s`` and integer zero point ``z``::

    q     = clamp(round(w / s) + z, 0, 2^b - 1)
    w_hat = s * (q - z)

*Min/max* (plain RTN): symmetric ``s = 2 max|w| / (2^b - 1)``, ``z = 2^(b-1)`` (the GPTQ and
compressed-tensors convention); asymmetric ``s = (max(w,0) - min(w,0)) / (2^b - 1)``,
``z = round(-min(w,0) / s)``.

*Clipping search* (``search=True``, as GPTQ's ``mse`` option): shrink the range by a factor
``p`` from 1 down to ``1 - max_shrink`` on a grid and keep, per group, the ``p`` minimising

    E(p) = sum_j  a_j (w_hat_j - w_j)^2

where ``a_j`` is the importance of input channel ``j`` (all ones without one). With importance
``a_j = E[x_j^2]`` (collected over calibration tokens), ``E`` is the expected squared error of the
layer output caused by this row, ``E[(x . (w_hat - w))^2]``, under a diagonal approximation of
``X^T X`` -- the quantity llama.cpp's ``--imatrix`` minimises. After the search the scale of each
group is refitted by weighted least squares for the chosen codes,
``s* = sum a (q - z) w / sum a (q - z)^2``, and kept where it lowers ``E``.

References: Frantar et al., "GPTQ" (2022), ``find_params(mse=True)``; llama.cpp ``make_qx_quants``
with ``quant_weights`` (ggml-quants.c) for the importance-weighted scale fit.

Shapes: ``weight (out, in)``, ``importance (in,)``; groups along ``in``.
"""

from __future__ import annotations

import torch

from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme


def _round(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to nearest in its storage ``dtype``, returned as float32.

    (Rounding *up* instead, so that a min/max grid always spans its group, was measured worse:
    SmolLM2 W4A16 g64 RTN, KLD 0.486 against 0.428 -- the extreme weights lose more than the
    slightly finer grid gains.)
    """
    return scale.to(dtype).float()


def _params(w: torch.Tensor, scheme: QuantScheme, p: float, scale_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``(out, G, 1)`` of groups ``w (out, G, gs)`` with the range shrunk by ``p``."""
    qmax = scheme.qmax
    if scheme.symmetric:
        amax = torch.maximum(w.amax(-1, keepdim=True), -w.amin(-1, keepdim=True)) * p  # no |w|-sized temporary
        scale = 2 * amax / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(scheme.sym_zero))
        scale = _round(scale, scale_dtype)
    else:
        lo = w.amin(-1, keepdim=True).clamp(max=0) * p
        hi = w.amax(-1, keepdim=True).clamp(min=0) * p
        scale = (hi - lo) / qmax
        scale = _round(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
        zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax)


def _err(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, a: torch.Tensor
         ) -> torch.Tensor:
    return (a * (scale * (q - zero) - w).square()).sum(-1, keepdim=True)


def fit_groups(
    w: torch.Tensor,
    scheme: QuantScheme,
    a: torch.Tensor | None = None,
    *,
    search: bool = False,
    grid: int = 40,
    max_shrink: float = 0.5,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, zero point ``(out, G, 1)`` and codes ``(out, G, gs)`` of the groups ``w (out, G, gs)``.

    ``a`` (broadcastable to ``w``) weights the error of the clipping search; ``None`` is all ones.
    Scales come back as float32 holding values exactly representable in ``scale_dtype``.
    """
    qmax = scheme.qmax
    if a is None:
        a = torch.ones(1, *w.shape[1:], device=w.device)
    scale, zero = _params(w, scheme, 1.0, scale_dtype)
    q = _codes(w, scale, zero, qmax)
    if not search:
        return scale, zero, q
    best = _err(w, q, scale, zero, a)
    for k in range(1, grid + 1):
        s2, z2 = _params(w, scheme, 1.0 - max_shrink * k / grid, scale_dtype)
        q2 = _codes(w, s2, z2, qmax)
        e2 = _err(w, q2, s2, z2, a)
        better = e2 < best
        best = torch.where(better, e2, best)
        scale, zero = torch.where(better, s2, scale), torch.where(better, z2, zero)
        q = torch.where(better, q2, q)
    for _ in range(2):  # weighted least-squares refit of the scale for the chosen codes
        d = q - zero
        num = (a * d * w).sum(-1, keepdim=True)
        den = (a * d * d).sum(-1, keepdim=True)
        s2 = torch.where((den > 0) & (num > 0), num / den.clamp(min=1e-30), scale)
        s2 = s2.to(scale_dtype).float()
        q2 = _codes(w, s2, zero, qmax)
        e2 = _err(w, q2, s2, zero, a)
        better = e2 < best
        best = torch.where(better, e2, best)
        scale, q = torch.where(better, s2, scale), torch.where(better, q2, q)
    return scale, zero, q


def fit_params(w: torch.Tensor, scheme: QuantScheme, a: torch.Tensor | None = None, *, search: bool = False,
               scale_dtype: torch.dtype = torch.float32, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``(out, G, 1)`` of the groups ``w (out, G, gs)``, as :func:`fit_groups`
    fits them, without keeping codes: the search runs ``rows`` rows at a time, so its temporaries
    are band-sized (GPTQ's static groups need only the parameters)."""
    if not search:
        return _params(w, scheme, 1.0, scale_dtype)
    parts = [fit_groups(w[r0:r0 + rows], scheme, a, search=True, scale_dtype=scale_dtype)[:2]
             for r0 in range(0, w.shape[0], rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """``Q(W) (out, in)`` dequantized, min/max RTN: the numerics of ``quantize_rtn(search=False)``.

    No validation and no :class:`QuantizedWeight`: the fast path for searches that quantize the
    same matrix many times (AWQ).
    """
    out, inp = weight.shape
    groups = scheme.n_groups(inp)
    w = weight.to(torch.float32).reshape(out, groups, inp // groups)
    scale, zero = _params(w, scheme, 1.0, scale_dtype)
    q = _codes(w, scale, zero, scheme.qmax)
    return (scale * (q - zero)).reshape(out, inp).to(weight.dtype)


def quantize_rtn(
    weight: torch.Tensor,
    scheme: QuantScheme,
    *,
    importance: torch.Tensor | None = None,
    search: bool = False,
    grid: int = 40,
    max_shrink: float = 0.5,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """Quantize ``weight (out, in)`` to ``scheme`` by round-to-nearest.

    Args:
        importance: ``(in,)`` non-negative weight of each input channel (e.g. ``E[x^2]``); implies
            ``search``, and weights its error.
        search: run the clipping search and least-squares scale refit.
        grid, max_shrink: the search tries ``p = 1 - max_shrink * k / grid`` for ``k = 0..grid``.
        scale_dtype: the dtype scales are stored in; codes are computed against the rounded scales
            so that what is stored reproduces exactly what was searched.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values")
    out, inp = weight.shape
    groups = scheme.n_groups(inp)
    gs = inp // groups
    w = weight.detach().to(torch.float32).reshape(out, groups, gs)
    a = None
    if importance is not None:
        if importance.shape != (inp,):
            raise ValueError(f"importance must have shape ({inp},), got {tuple(importance.shape)}")
        a = importance.detach().to(torch.float32, copy=True).to(w.device).clamp(min=0)
        a = a / a.mean().clamp(min=1e-30) + 1e-6  # scale-free, and no channel exactly ignored
        a = a.reshape(1, groups, gs)
        search = True
    scale, zero, q = fit_groups(w, scheme, a, search=search, grid=grid, max_shrink=max_shrink,
                                scale_dtype=scale_dtype)
    return QuantizedWeight(
        codes=q.reshape(out, inp).to(torch.uint8),
        scales=scale.reshape(out, groups).to(scale_dtype),
        zeros=zero.reshape(out, groups).to(torch.uint8),
        scheme=scheme,
    )
