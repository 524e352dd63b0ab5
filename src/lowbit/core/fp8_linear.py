"""float8 E4M3 weights and the runtime linear that computes with them (weight-only or W8A8).

E4M3 (``torch.float8_e4m3fn``): 1 sign, 4 exponent, 3 mantissa bits, no infinities, largest
finite value 448. Canonical form of one weight ``W (out, in)``::

    weight  (out, in)                      float8_e4m3fn  q = sat(W / s)
    scale   (out, 1)                       storage dtype  per output channel, or
            (ceil(out/B), ceil(in/B))      storage dtype  one per B x B block (last ones partial)

    W_hat[r, j] = float(q[r, j]) * float(scale[r, 0])           (per channel)
    W_hat[r, j] = float(q[r, j]) * float(scale[r // B, j // B])  (blocks)

Dynamic per-token activations (W8A8, ``scheme.activations == "fp8-token"``), for ``x (..., in)``::

    sx    = max(max_j |x_j| / 448, tiny)     (..., 1) float32
    x8    = sat(x / sx)                      (..., in) float8_e4m3fn
    y     = (x8 @ q^T) * sx * scale^T + b    (per-channel weights: the scaled-GEMM epilogue)
    y     = (x8 * sx) @ W_hat^T + b          (block weights)

``sat(v) = clamp(v, -448, 448)`` cast to float8 (the cast rounds to nearest, ties to even).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import SchemeError

log = logging.getLogger(__name__)

FP8_MAX = 448.0
ACT_MIN_SCALE = torch.finfo(torch.float32).tiny  # a token of zeros gets this scale (codes 0), never 0/0
_SCALED_MM_BROKEN = False  # set after the first failure of torch._scaled_mm: fall back, warn once


def fp8_available() -> bool:
    """Whether this torch has the ``float8_e4m3fn`` dtype (torch >= 2.1)."""
    return hasattr(torch, "float8_e4m3fn")


def fp8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``, or a :class:`SchemeError` saying how to get it."""
    if not fp8_available():
        raise SchemeError(f"FP8 needs torch >= 2.1 with float8 dtypes (this is torch {torch.__version__}); "
                          "upgrade torch")
    dt: torch.dtype = torch.float8_e4m3fn
    return dt


def saturate_cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(x / scale, -448, 448)`` in float32, cast to float8 E4M3 (round to nearest even).

    ``scale`` broadcasts against ``x``. float8_e4m3fn has no infinity and what a plain cast does
    with ``|v| > 448`` depends on the backend and torch version (NaN in some, 448 in others, as
    torch 2.13 on CPU); the explicit clamp makes saturation the defined behaviour everywhere.
    """
    dt = fp8_dtype()
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(dt)


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """Block scales ``(ceil(out/B), ceil(in/B))`` repeated to one per weight ``(out, in)``."""
    out, inp = shape
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out, :inp]


@dataclass
class FP8Weight:
    """One linear's FP8 weight: ``weight (out, in)`` float8 E4M3 and its ``scale`` (see module docstring)."""

    weight: torch.Tensor
    scale: torch.Tensor
    scheme: DataTypeScheme

    def __post_init__(self) -> None:
        if self.weight.dtype != fp8_dtype() or self.weight.ndim != 2:
            raise ValueError(f"FP8 weight must be a 2-D float8_e4m3fn tensor, got {self.weight.dtype} "
                             f"{tuple(self.weight.shape)}")
        want = self.scale_shape(self.shape, self.scheme.block_size)
        if tuple(self.scale.shape) != want:
            raise ValueError(f"FP8 scale must have shape {want} for weight {self.shape} "
                             f"({'per channel' if self.scheme.block_size is None else 'blocks'}), "
                             f"got {tuple(self.scale.shape)}")

    @staticmethod
    def scale_shape(shape: tuple[int, int], block: int | None) -> tuple[int, int]:
        out, inp = shape
        return (out, 1) if block is None else (-(-out // block), -(-inp // block))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.weight.shape[0]), int(self.weight.shape[1]))

    def full_scale(self) -> torch.Tensor:
        """The scale of every weight, float32: ``(out, 1)`` per channel, ``(out, in)`` for blocks."""
        s = self.scale.float()
        bs = self.scheme.block_size
        return s if bs is None else expand_block_scale(s, self.shape, bs)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat (out, in)`` in ``dtype``, computed in float32 (exact for bfloat16/float16 scales)."""
        return (self.weight.float() * self.full_scale()).to(dtype)

    def to(self, device: str | torch.device) -> FP8Weight:
        return FP8Weight(self.weight.to(device), self.scale.to(device), self.scheme)


def quantize_act_per_token(x: torch.Tensor, min_scale: float = ACT_MIN_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token float8 quantization of ``x (..., in)``: ``(x8 (..., in) fp8, sx (..., 1) fp32)``.

    ``sx = max(amax_j |x_j| / 448, min_scale)``, ``x8 = sat(x / sx)``; ``x8 * sx`` approximates ``x``
    with a relative error per element of at most 2^-4 (half a unit of E4M3's 3-bit mantissa) for
    values in E4M3's normal range (``|x_j| >= 2^-6 sx``), and ``2^-10 sx`` absolute below it.
    vLLM clamps ``sx`` to at least ``1 / (448 * 512)``; pass that as ``min_scale`` to match it.
    """
    sx = (x.detach().float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=min_scale)
    return saturate_cast(x, sx), sx


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _scaled_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the hardware row-wise scaled FP8 GEMM can run: CUDA, SM >= 8.9, ``in`` and ``out`` multiples
    of 16 (``torch._scaled_mm``'s requirement on ``K`` and ``N``; any ``M``)."""
    if _SCALED_MM_BROKEN or not x.is_cuda or not hasattr(torch, "_scaled_mm"):
        return False
    if _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) < (8, 9):
        return False
    return w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0


class FP8Linear(nn.Module):
    """Drop-in ``nn.Linear`` computing with float8 E4M3 weights (and, for W8A8, activations).

    Weight-only: ``y = x W_hat^T + b`` with ``W_hat`` dequantized (kept when ``cache``) and one matmul.

    W8A8 (``scheme.activations == "fp8-token"``): the input is quantized per token
    (:func:`quantize_act_per_token`). On CUDA with compute capability >= 8.9 and per-channel
    weights, ``torch._scaled_mm(x8, q^T, scale_a=sx, scale_b=scale^T, out_dtype=bfloat16)`` runs
    the GEMM on the FP8 tensor cores with row-wise scales. Everywhere else (CPU, older GPUs,
    block-scaled weights) the *same math* runs as an "fp8 emulated GEMM": the float8 operands are
    real (the same ``x8`` and ``q``), but they are upcast and multiplied in float32, then scaled;
    results agree with the hardware path up to accumulation order and its bfloat16 output rounding.

    Buffers: ``weight (out, in)`` float8_e4m3fn, ``weight_scale`` (see :class:`FP8Weight`), ``bias``.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, scheme: DataTypeScheme, *, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        sshape = FP8Weight.scale_shape((out_features, in_features), scheme.block_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=fp8_dtype()))
        self.register_buffer("weight_scale", torch.ones(sshape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.cache = False
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, fw: FP8Weight, bias: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> FP8Linear:
        """A module holding ``fw`` on ``fw``'s device; ``weight_scale`` in ``dtype`` (default: ``fw.scale``'s)."""
        out, inp = fw.shape
        m = cls(inp, out, fw.scheme, bias=bias is not None, dtype=dtype or fw.scale.dtype)
        m.weight.copy_(fw.weight)
        m.weight_scale.copy_(fw.scale.to(m.weight_scale.dtype))
        if bias is not None and m.bias is not None:
            m.bias.data = bias.detach().clone()
        return m.to(fw.weight.device)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``module.to(dtype)`` casts every floating tensor, float8 included: move, but keep the stored dtypes."""
        dtypes = (self.weight.dtype, self.weight_scale.dtype)
        super()._apply(fn, recurse)
        if (self.weight.dtype, self.weight_scale.dtype) != dtypes:  # float8 -> 16/32-bit -> float8 is exact
            self.weight = self.weight.to(dtypes[0])
            self.weight_scale = self.weight_scale.to(dtypes[1])
        return self

    @property
    def w8a8(self) -> bool:
        return self.scheme.activations == "fp8-token"

    def fp8_weight(self) -> FP8Weight:
        return FP8Weight(self.weight, self.weight_scale, self.scheme)

    def _operand(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The dense right-hand operand: ``W_hat`` (weight-only, blocks) or ``float(q)`` (W8A8 per channel)."""
        w = self._dense
        if w is None or w.dtype != dtype or w.device != device:
            fw = self.fp8_weight()
            w = fw.weight.float() if self.w8a8 and self.scheme.block_size is None else fw.dequantize()
            w = w.to(device=device, dtype=dtype)
            self._dense = w if self.cache else None
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.w8a8:
            w = self._operand(x.dtype, x.device)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        x8, sx = quantize_act_per_token(x)
        y = self._scaled_gemm(x8, sx) if self.scheme.block_size is None else None
        if y is None:
            y = self._emulated_gemm(x8, sx, x.device)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _emulated_gemm(self, x8: torch.Tensor, sx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """fp8 emulated GEMM in float32 (see the class docstring)."""
        w = self._operand(torch.float32, device)
        if self.scheme.block_size is None:
            return (x8.float() @ w.t()) * sx * self.weight_scale.float().t()
        return (x8.float() * sx) @ w.t()

    def _scaled_gemm(self, x8: torch.Tensor, sx: torch.Tensor) -> torch.Tensor | None:
        """``torch._scaled_mm`` with row-wise scales, or ``None`` where it cannot run."""
        global _SCALED_MM_BROKEN
        if not _scaled_mm_ok(x8, self.weight):
            return None
        lead = x8.shape[:-1]
        try:
            y = torch._scaled_mm(x8.reshape(-1, self.in_features).contiguous(), self.weight.t(),
                                 scale_a=sx.reshape(-1, 1).contiguous(),
                                 scale_b=self.weight_scale.float().reshape(1, -1).contiguous(),
                                 out_dtype=torch.bfloat16)
        except RuntimeError as e:  # e.g. a build without row-wise scaling on this architecture
            _SCALED_MM_BROKEN = True
            log.warning("torch._scaled_mm failed (%s); FP8 W8A8 falls back to the fp8 emulated GEMM", e)
            return None
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label}"


def replace_with_fp8(model: nn.Module, fweights: dict[str, FP8Weight], *, cache: bool = True,
                     dtype: torch.dtype | None = None) -> nn.Module:
    """Swap each named ``nn.Linear`` of ``model`` for an :class:`FP8Linear` holding ``fweights[name]``.

    The in-memory FP8 model (W8A8 included) that a saved artifact must reproduce; biases are kept.
    """
    for name, fw in fweights.items():
        old = model.get_submodule(name)
        bias = getattr(old, "bias", None)
        device = next(old.parameters()).device
        q = FP8Linear.from_weight(fw.to(device), None if bias is None else bias.detach(), dtype)
        q.cache = cache
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, q)
    return model
