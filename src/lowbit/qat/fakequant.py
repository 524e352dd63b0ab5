"""A linear layer that trains through its own quantizer: straight-through rounding, learnable step sizes.

For ``W (out, in)`` with ``G`` groups along ``in`` (group ``g(j)`` of column ``j``), ``b`` bits,
``Q = 2^b - 1``, the forward pass uses::

    s      = bf16(s_param)                   scale, rounded to the artifact's storage dtype  (out, G)
    z      = clamp(round(z_param), 0, Q)     integer zero point (2^(b-1), fixed, when symmetric)  (out, G)
    q      = clamp(round(W / s_g) + z_g, 0, Q)                                    codes  (out, in)
    W_hat  = s_g * (q - z_g)                                                      (out, in)
    y      = x W_hat^T + b

Every rounding (the codes, the zero points, the storage dtype of the scales) is *straight-through*:
the forward value is rounded, the backward pass treats the rounding as the identity (Bengio et al.
2013). The scale's gradient is then LSQ's (Esser et al., "Learned Step Size Quantization", 2020):
``dW_hat/ds = round(W/s) - W/s`` for a weight inside the grid and ``q - z`` (the clipping bound) for
a clipped one; the zero point gets ``-s`` from the clipped weights only (LSQ+, Bhalgat et al. 2020,
with an integer offset so that the artifact stores it exactly). The latent weight ``W`` gets the
straight-through gradient inside the grid and none where it is clipped.

With the codes frozen (:meth:`FakeQuantLinear.freeze_codes`; EfficientQAT's E2E-QP, Chen et al. 2024)
``q`` is a fixed integer tensor and only the step sizes (and zero points) train::

    W_hat = s_g * (q - z_g),   dW_hat/ds = q - z,   dW_hat/dz = -s

This is the only way scales can train from a GPTQ or AWQ result: its latent weight sits at the centre
of each cell (``W / s = q - z`` exactly), where LSQ's ``round(W/s) - W/s`` is 0 for every weight, so
scales-only training through the rounding receives no gradient at all.

:meth:`FakeQuantLinear.qweight` returns exactly the codes, scales and zero points the forward pass
used, so the exported artifact computes the same ``W_hat`` bit for bit (codes are integers, the scale
a value of the storage dtype, and ``s * (q - z)`` the same float32 product on both sides).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme

log = logging.getLogger(__name__)

#: smallest scale the forward pass uses (a scale trained to zero or below would divide by zero)
MIN_SCALE = 1e-8


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def ste_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (and back to ``x``'s dtype) forward, identity backward."""
    if dtype == x.dtype:
        return x
    return x + (x.to(dtype).to(x.dtype) - x).detach()


def _forward(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    return (s * (torch.clamp(torch.round(w / s) + z, 0, qmax) - z)).to(dtype)


def _backward(g: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = g.to(torch.float32)
    x = w / s
    r = torch.round(x)
    q = r + z
    inside = (q >= 0) & (q <= qmax)
    dw = g * inside
    ds = (g * torch.where(inside, r - x, q.clamp(0, qmax) - z)).sum(-1, keepdim=True)
    dz = (g * torch.where(inside, torch.zeros_like(s), -s)).sum(-1, keepdim=True)
    return dw, ds, dz


_EAGER = (_forward, _backward)
_kernels: list[Any] = [_EAGER]  # the pair in use: eager, or compiled while :func:`compiled` is active
_compiled: dict[str, Any] = {}


@contextmanager
def compiled(on: bool = True) -> Iterator[None]:
    """Run :class:`FakeQuant` through ``torch.compile`` d kernels inside the block (one fused loop per pass
    instead of ~8 memory-bound ones: 10-15x less time on a CPU); where compiling fails (no C++ compiler, an
    unsupported backend) the eager kernels are used, with a warning."""
    if not on:
        yield
        return
    if not _compiled:
        _compiled["pair"] = (torch.compile(_forward, dynamic=True), torch.compile(_backward, dynamic=True))
    _kernels.append(_compiled["pair"])
    try:
        yield
    finally:
        _kernels.pop()


def _call(which: int, *args: Any) -> Any:
    pair = _kernels[-1]
    if pair is _EAGER:
        return _EAGER[which](*args)
    try:
        return pair[which](*args)
    except Exception as e:  # noqa: BLE001 -- any compiler failure falls back to the same arithmetic, eager
        log.warning("torch.compile of the fake-quant kernels failed (%s); running them eagerly", e)
        _kernels[:] = [_EAGER] * len(_kernels)
        _compiled["pair"] = _EAGER
        return _EAGER[which](*args)


class FakeQuant(torch.autograd.Function):
    """``W_hat = s * (clamp(round(w / s) + z, 0, Q) - z)`` for groups ``w (out, G, gs)``, ``s, z (out, G, 1)``,
    returned in ``dtype`` (the autocast dtype while training: the matmul reads it as it is).

    Nothing weight-sized is kept for the backward pass (the codes are recomputed from ``w, s, z``), which
    writes the straight-through / LSQ gradients of the module docstring::

        inside = 0 <= round(w/s) + z <= Q
        dL/dw  = g * inside
        dL/ds  = sum_group g * (round(w/s) - w/s   if inside else  q - z)
        dL/dz  = sum_group g * (0                  if inside else  -s)
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        ctx.save_for_backward(w, s, z)
        ctx.qmax = qmax
        return _call(0, w, s, z, qmax, dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, s, z = ctx.saved_tensors
        dw, ds, dz = _call(1, g, w, s, z, ctx.qmax)
        need = ctx.needs_input_grad
        return dw if need[0] else None, ds if need[1] else None, dz if need[2] else None, None, None


class FakeQuantLinear(nn.Module):
    """``nn.Linear`` replacement whose weight is quantized in every forward (see the module docstring).

    Parameters: ``weight (out, in)`` (the latent weight; trainable when ``train_weight``),
    ``weight_scale (out, G)`` and, for asymmetric schemes, ``weight_zero_point (out, G)`` (float, rounded
    in the forward pass); ``bias`` is kept frozen. ``scale_dtype`` is the dtype the artifact stores
    scales in. ``weight_g_idx (in,)`` is the group of each input column when the PTQ result had
    act-order with dynamic groups (empty otherwise).
    """

    weight_g_idx: torch.Tensor
    weight_zero_point: torch.Tensor

    def __init__(self, weight: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *,
                 scale_dtype: torch.dtype = torch.bfloat16, train_weight: bool = True) -> None:
        super().__init__()
        out, inp = qw.shape
        if tuple(weight.shape) != (out, inp):
            raise ValueError(f"latent weight {tuple(weight.shape)} does not match the quantized shape {(out, inp)}")
        self.in_features, self.out_features, self.scheme, self.scale_dtype = inp, out, qw.scheme, scale_dtype
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone(), requires_grad=train_weight)
        self.weight_scale = nn.Parameter(qw.scales.detach().to(torch.float32).clone())
        zeros = qw.zeros.detach().to(torch.float32).clone()
        if qw.scheme.symmetric:
            self.register_buffer("weight_zero_point", zeros)
        else:
            self.weight_zero_point = nn.Parameter(zeros)
        self.register_buffer("weight_g_idx", torch.empty(0, dtype=torch.int64) if qw.g_idx is None
                             else qw.g_idx.detach().to(torch.int64).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("weight_codes", torch.empty(0, dtype=torch.uint8))  # (out, in) once frozen

    @property
    def frozen(self) -> bool:
        """Whether the codes are frozen (only scales and zero points train)."""
        return bool(self.weight_codes.numel())

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Fix the codes at the current forward pass's (:meth:`qweight`); from now on only the scales and zero
        points train (``W_hat = s (q - z)``), and the latent weight is dropped."""
        if self.frozen:
            return
        self.weight_codes = self.qweight().codes.clone()
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.float32), requires_grad=False)

    @property
    def n_groups(self) -> int:
        return int(self.weight_scale.shape[1])

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        """``(out, G)`` -> ``(out, in)`` by each column's group."""
        if self.weight_g_idx.numel():
            return t[:, self.weight_g_idx]
        return t.repeat_interleave(self.in_features // self.n_groups, dim=1)

    def quant_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and integer zero point ``(out, G)`` the forward pass uses, float32 (straight-through)."""
        s = ste_cast(self.weight_scale.clamp(min=MIN_SCALE), self.scale_dtype)
        z: torch.Tensor = self.weight_zero_point
        if not self.scheme.symmetric:
            z = ste_round(z).clamp(0, self.scheme.qmax)
        return s, z

    def fake_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat (out, in)`` in ``dtype`` (computed in float32), differentiable in the latent weight, the scales
        and the zero points."""
        s, z = self.quant_params()
        if self.frozen:  # E2E-QP: fixed codes, plain autograd gives dW_hat/ds = q - z and dW_hat/dz = -s
            q = self.weight_codes.to(torch.float32)
            if self.weight_g_idx.numel():
                return (self._expand(s) * (q - self._expand(z))).to(dtype)
            q = q.reshape(self.out_features, self.n_groups, -1)  # (out, G, gs) against (out, G, 1), as below
            return (s.unsqueeze(-1) * (q - z.unsqueeze(-1))).reshape(self.out_features, self.in_features).to(dtype)
        if not self.weight_g_idx.numel():  # contiguous groups: (out, G, gs) against (out, G, 1)
            w = self.weight.reshape(self.out_features, self.n_groups, -1)
            return FakeQuant.apply(w, s.unsqueeze(-1), z.unsqueeze(-1), self.scheme.qmax, dtype).reshape(
                self.out_features, self.in_features)
        return FakeQuant.apply(self.weight.unsqueeze(-1), self._expand(s).unsqueeze(-1), self._expand(z).unsqueeze(-1),
                               self.scheme.qmax, dtype).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        w = self.fake_weight(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), w, b)

    @torch.no_grad()
    def qweight(self) -> QuantizedWeight:
        """The codes, scales (storage dtype) and zero points of the current forward pass."""
        s, z = self.quant_params()
        if self.frozen:
            q = self.weight_codes
        else:
            q = torch.clamp(torch.round(self.weight / self._expand(s)) + self._expand(z), 0, self.scheme.qmax)
        g_idx = self.weight_g_idx.to(torch.int32) if self.weight_g_idx.numel() else None
        return QuantizedWeight(q.to(torch.uint8), s.to(self.scale_dtype), z.to(torch.uint8), self.scheme, g_idx)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label}, "
                f"train_weight={self.weight.requires_grad}, frozen_codes={self.frozen}")


def project_into_cells(w: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """``w (out, in)`` moved into the rounding cell of ``qw``'s codes: the latent weight closest to ``w``
    whose rounding gives exactly ``qw``'s codes (``|w/s - (q - z)| < 1/2``; open at the ends of the grid,
    where clamping keeps the code). Round to nearest (RTN) returns ``w`` itself, unchanged but for
    clipped weights; after GPTQ it keeps what of ``w`` agrees with GPTQ's decisions."""
    g = qw.group_index().to(w.device)
    s = qw.scales.to(torch.float32)[:, g]
    d = qw.codes.to(torch.float32) - qw.zeros.to(torch.float32)[:, g]  # signed code
    margin = 0.5 - 1e-3  # strictly inside the cell: round(w/s) is q however the division rounds
    x = w.to(torch.float32) / s
    lo = torch.where(qw.codes > 0, d - margin, torch.full_like(d, -torch.inf))
    hi = torch.where(qw.codes < qw.scheme.qmax, d + margin, torch.full_like(d, torch.inf))
    y = torch.minimum(torch.maximum(x, lo), hi)
    return torch.where(y == x, w.to(torch.float32), y * s)  # weights already inside stay bit-exact


def freeze_all_codes(model: nn.Module) -> int:
    """Freeze the codes of every fake-quant layer of ``model`` (see :meth:`FakeQuantLinear.freeze_codes`); returns
    how many layers were frozen."""
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    for m in layers:
        m.freeze_codes()
    return len(layers)


def scheme_of(m: nn.Module) -> QuantScheme | None:
    """The scheme of a fake-quant layer, None for anything else."""
    return m.scheme if isinstance(m, FakeQuantLinear) else None
