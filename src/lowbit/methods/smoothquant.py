"""SmoothQuant: migrate activation outliers into the weights, then W8A8 (int8 weights and activations).

Reference: Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023 (arXiv:2211.10438), eq. (4).

A few input channels of a transformer's activations carry values 10-100x larger than the rest
(systematic outliers); a per-token int8 scale then spends almost all of its 255 levels on them.
For a group of linears ``W_1..W_n`` (each ``(out_i, in)``) sharing the input ``X (tokens, in)``,
SmoothQuant divides input channel ``j`` by ``s_j`` and multiplies column ``j`` of every weight by
``s_j`` -- exact in float arithmetic (``(X / s) (W diag(s))^T = X W^T``), folded into the module
that produces ``X`` (:mod:`lowbit.pipeline.scaling`)::

    a_j = max_t |X_tj|                          (calibration: per-input-channel absmax)
    w_j = max_i max_r |W_i[r, j]|               (over every linear of the group)
    s_j = a_j^alpha / w_j^(1 - alpha)           alpha in [0, 1]: 0.5 balances the two (the paper's
                                                default; 0.75-0.85 for models with strong outliers)

so that after smoothing ``max|X'_j| = max|W'_j| = sqrt(a_j w_j)`` at ``alpha = 0.5``: the
difficulty is shared. Guards: ``a_j`` and ``w_j`` are clamped at ``eps`` before the powers; a
channel whose activation or weight absmax is zero (dead) keeps ``s_j = 1``. Normalisation: the
live scales are divided by their geometric mean (``exp(mean(log s))``), so activations and
weights keep their overall magnitude (useful for float16 models). Multiplying ``s`` by a constant
changes no quantized result up to rounding: per-token activation scales, per-tensor static scales
and per-channel weight scales all absorb it.

Weights: int8 symmetric per output channel, ``scale_r = max_j |W_rj| / 127.5`` (rounded to the
storage dtype), unsigned codes ``q = clamp(round(W / scale) + 128, 0, 255)`` with the fixed zero
point 128 -- the signed int8 weight is ``q - 128`` in ``[-128, 127]``, compressed-tensors' own
observer and layout (:func:`lowbit.methods.rtn.quantize_rtn`).

Static activations (``W8A8_STATIC``): one scale per layer from the calibration absmax of the
(smoothed) input, ``s_x = max_tj |X_tj| / 127``, so the calibrated range maps onto ``[-127, 127]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowbit.core.errors import SchemeError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import PRESETS, QuantScheme
from lowbit.methods.rtn import quantize_rtn

__all__ = ["INT8_MAX", "act_scale_static", "quantize_w8", "smooth_scales", "weight_absmax"]

INT8_MAX = 127


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``w_j = max_i max_r |W_i[r, j]|`` over weights ``(out_i, in)`` sharing one input: ``(in,)`` float32."""
    if not weights:
        raise SchemeError("smooth_scales needs at least one weight of the group")
    ins = {int(w.shape[-1]) for w in weights}
    if len(ins) != 1 or any(w.ndim != 2 for w in weights):
        raise SchemeError(f"the weights of a group must be 2-D with one input size, got "
                          f"{[tuple(w.shape) for w in weights]}")
    return torch.stack([w.detach().abs().amax(0).to(torch.float32) for w in weights]).amax(0)


def smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5,
                  eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant scales ``s (in,)`` float32, finite and > 0 (module docstring).

    Args:
        act_absmax: ``(in,)`` per-input-channel ``max_t |X_tj|`` over the calibration tokens.
        weights: the group's weights, each ``(out_i, in)``.
        alpha: migration strength in ``[0, 1]``.
        eps: floor of ``a_j`` and ``w_j`` before the powers.
    """
    if not 0.0 <= alpha <= 1.0:
        raise SchemeError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
    w = weight_absmax(weights).cpu()
    a = act_absmax.detach().to(device="cpu", dtype=torch.float32)
    if a.shape != w.shape:
        raise SchemeError(f"activation absmax has shape {tuple(a.shape)}, the weights' input is {tuple(w.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise SchemeError("activation statistics contain NaN or Inf: the calibration run diverged")
    s = a.clamp(min=eps).pow(alpha) / w.clamp(min=eps).pow(1.0 - alpha)
    live = (a > 0) & (w > 0)
    if bool(live.any()):
        s = s / torch.exp(torch.log(s[live]).mean())
    return torch.where(live, s, torch.ones_like(s))


def quantize_w8(weight: torch.Tensor, scheme: QuantScheme | None = None,
                scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """int8 symmetric per-channel ``weight (out, in)``: codes ``(out, in)`` uint8 (zero 128), scales ``(out, 1)``.

    ``scheme`` defaults to the ``W8A8`` preset; any 8-bit symmetric per-channel scheme is accepted.
    """
    scheme = scheme or PRESETS["W8A8"]
    if scheme.bits != 8 or scheme.group_size is not None or not scheme.symmetric:
        raise SchemeError(f"W8A8 weights are int8 symmetric per channel, got {scheme.label}")
    return quantize_rtn(weight, scheme, scale_dtype=scale_dtype)


def act_scale_static(absmax: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Static per-tensor activation scale ``max|X| / 127`` (0-d float32), rounded to ``dtype`` (its storage).

    An all-zero (or missing) range gives the smallest positive normal of ``dtype``, never 0.
    """
    a = torch.as_tensor(absmax, dtype=torch.float32).detach().cpu().abs().amax()
    if not bool(torch.isfinite(a)):
        raise SchemeError("activation absmax is NaN or Inf: the calibration run diverged")
    s = (a / INT8_MAX).to(dtype)
    return s.clamp(min=torch.finfo(dtype).tiny).to(torch.float32)
