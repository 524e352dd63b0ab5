"""CPU runtime linears on torch's packed int4 / int8 kernels (batch-1 decode speed on plain CPUs).

* ``cpu-int4``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (tinygemm's CPU port, AVX2/AVX-512).
  Its weight formula is ``W = (q - 8) * scale + zero`` per group of 32/64/128/256 columns, with
  ``scale`` and ``zero`` in the activation dtype, packed as ``qScaleAndZeros (G, N, 2)``. lowbit's
  ``W = s (q - z)`` maps onto it with ``zero = s (8 - z)``: exact for symmetric schemes
  (``z = 8``, ``zero = 0``); for asymmetric ones ``zero`` is rounded once to the activation dtype, a
  weight error of at most ``|s (8 - z)| * 2^-9`` (bf16), under 1/64 of the step ``s``. Per-channel
  weights use the largest supported group dividing ``K``, each of its groups carrying the channel's
  scale (exact). Needs ``N % 16 == 0``.
* ``cpu-int8``: ``torch.ops.aten._weight_int8pack_mm`` (``W = w_int8 * scale`` per output channel):
  symmetric per-channel 8-bit schemes, ``w_int8 = q - 128`` exactly.

Both run in one activation dtype fixed at build (:func:`kernel_dtype`: bf16 unless the model
computes in fp16; torch's float32 variants of these kernels are several times slower here):
inputs of another dtype are cast to it and the output is cast back, and ``module.to(dtype)``
moves the module but keeps that dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.qlinear import QuantLinear

INT4_GROUPS = (256, 128, 64, 32)


def kernel_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype of the CPU kernels for a model computing in ``model_dtype``."""
    return torch.float16 if model_dtype == torch.float16 else torch.bfloat16


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def int4_group(q: QuantLinear) -> int | None:
    """The group size the int4 CPU kernel would use for ``q`` (None when it cannot)."""
    gs = q.scheme.group_size
    if gs is not None:
        return gs if gs in INT4_GROUPS else None
    return next((g for g in INT4_GROUPS if q.in_features % g == 0), None)


def unsupported_int4(q: QuantLinear) -> str | None:
    if not _has("_weight_int4pack_mm_for_cpu") or not _has("_convert_weight_to_int4pack_for_cpu"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if q.scheme.bits != 4 or q.scheme.act_bits or q.weight_g_idx.numel():
        return "not a 4-bit weight-only layer with contiguous groups"
    if q.out_features % 16:
        return f"out_features {q.out_features} is not a multiple of 16"
    if int4_group(q) is None:
        return f"group size {q.scheme.group_size} (the int4 CPU kernel takes {INT4_GROUPS})"
    return None


def unsupported_int8(q: QuantLinear) -> str | None:
    if not _has("_weight_int8pack_mm"):
        return f"torch {torch.__version__} has no _weight_int8pack_mm"
    s = q.scheme
    if s.bits != 8 or s.act_bits or not s.symmetric or s.group_size is not None or q.weight_g_idx.numel():
        return "the int8 CPU kernel takes symmetric per-channel 8-bit weights only"
    return None


class _CPULinear(nn.Module):
    backend = "cpu"
    kernel_name = "torch CPU kernel"  # what lowbit.compare.speed reads
    dequantized = False

    def __init__(self, q: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.dtype = q.in_features, q.out_features, q.scheme, dtype
        self.bias = (nn.Parameter(q.bias.detach().to("cpu", dtype), requires_grad=False)
                     if q.bias is not None else None)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to(device/dtype)`` moves the module; the kernel's activation dtype stays (see the module docstring)."""
        super()._apply(fn, recurse)
        for name, t in self._buffers.items():
            if t is not None and t.is_floating_point() and t.dtype != self.dtype:
                self._buffers[name] = t.to(self.dtype)
        if self.bias is not None and self.bias.dtype != self.dtype:
            self.bias = nn.Parameter(self.bias.detach().to(self.dtype), requires_grad=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        y = self._mm(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label}, "
                f"backend={self.backend}, dtype={self.dtype}")


class CPUInt4Linear(_CPULinear):
    """4-bit weights through ``_weight_int4pack_mm_for_cpu`` (see the module docstring)."""

    backend = "cpu-int4"
    kernel_name = "torch _weight_int4pack_mm_for_cpu"
    packed: torch.Tensor
    scale_zeros: torch.Tensor

    def __init__(self, q: QuantLinear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(q, dtype)
        qw = q.qweight()
        gs = int4_group(q)
        assert gs is not None, unsupported_int4(q)
        self.group = gs
        reps = 1 if q.scheme.group_size is not None else q.in_features // gs
        s = qw.scales.to(torch.float32).repeat_interleave(reps, 1)  # (N, K / gs)
        z = qw.zeros.to(torch.float32).repeat_interleave(reps, 1)
        zero = s * (8.0 - z)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            qw.codes.to("cpu", torch.int32).contiguous(), 1))
        self.register_buffer("scale_zeros", torch.stack([s.t(), zero.t()], -1).to("cpu", dtype).contiguous())

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zeros)


class CPUInt8Linear(_CPULinear):
    """Symmetric per-channel 8-bit weights through ``_weight_int8pack_mm``."""

    backend = "cpu-int8"
    kernel_name = "torch _weight_int8pack_mm"
    weight_int8: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: QuantLinear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(q, dtype)
        qw = q.qweight()
        self.register_buffer("weight_int8", (qw.codes.to(torch.int16) - q.scheme.sym_zero).to("cpu", torch.int8))
        self.register_buffer("scales", qw.scales[:, 0].to("cpu", dtype).contiguous())

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales)
