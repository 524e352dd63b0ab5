"""``W8A8Linear``: int8 weights per channel and int8 activations, through a real int8 GEMM.

For ``x (T, in)`` (leading dimensions flattened), ``Wq (out, in)`` int8 in ``[-128, 127]`` and
``s_w (out, 1)``::

    dynamic (per token):  s_x[t] = max_j |x_tj| / 127          (1 for an all-zero token: it stays 0)
    static (per tensor):  s_x    = input_scale                  (calibrated)
    xq      = clamp(round(x / s_x), -128, 127)                  int8, computed in float32 (round half to even)
    acc     = xq @ Wq^T                                         int32: torch._int_mm (exact integer sums)
    y       = float32(acc) * s_x[t] * s_w[r]  (+ bias)          then cast to x.dtype

The GEMM is a *real* int8 matrix multiplication (``torch._int_mm``, int8 operands, int32
accumulation; :func:`lowbit.core.bnb_linear.int8_matmul`), not a float emulation: the only
float operations are the activation scaling and the output dequantization. ``float32(acc)`` is
exact while ``|acc| < 2^24`` (relative error <= 2^-24 beyond).

Conventions, as vLLM's int8 W8A8 kernels (``scaled_int8_quant``: dynamic ``s_x = absmax / 127``,
saturation to ``[-128, 127]``) and compressed-tensors' layout (``weight`` int8, ``weight_scale
(out, 1)``, static ``input_scale (1,)``). Dynamic codes lie in ``[-127, 127]`` by construction;
only a static scale too small for its input reaches -128. compressed-tensors' own CPU
fake-quantization uses ``s_x = absmax / 127.5`` for dynamic tokens (a slightly different
activation grid) and the same static rule.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.bnb_linear import int8_matmul
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme

__all__ = ["W8A8Linear", "quantize_act_int8", "replace_with_w8a8", "w8a8_reference"]

ACT_QMAX = 127.0  # dynamic: s_x = absmax / 127
ACT_QMIN = -128.0  # saturation, as vLLM


def quantize_act_int8(x: torch.Tensor, input_scale: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq (..., in) int8, s_x (..., 1) float32)``: per token when ``input_scale`` is None, else static.

    ``xq * s_x`` approximates ``x`` within ``s_x / 2`` per element inside ``[-128 s_x, 127 s_x]``.
    """
    a = x.detach().to(torch.float32)
    if input_scale is None:
        amax = a.abs().amax(-1, keepdim=True)
        sx = torch.where(amax > 0, amax / ACT_QMAX, torch.ones_like(amax))
    else:
        sx = input_scale.detach().to(device=a.device, dtype=torch.float32).reshape(1).expand(*a.shape[:-1], 1)
    return torch.round(a / sx).clamp_(ACT_QMIN, ACT_QMAX).to(torch.int8), sx


def w8a8_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same quantized operands multiplied in float64 (exact): the reference of :class:`W8A8Linear`."""
    xq, sx = quantize_act_int8(x, input_scale)
    acc = xq.to(torch.float64) @ weight.to(torch.float64).t()
    y = acc * sx.to(torch.float64) * weight_scale.to(torch.float64).reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)


class W8A8Linear(nn.Module):
    """Drop-in ``nn.Linear`` computing int8 x int8 -> int32 (module docstring).

    Buffers: ``weight (out, in)`` int8, ``weight_scale (out, 1)`` (its storage dtype, kept by
    ``module.to(dtype)``), ``input_scale (1,)`` for static activations (else absent); ``bias``.
    With ``cache`` the transposed contiguous int8 weight ``(in, out)`` is kept after the first call
    (``torch._int_mm`` on the CPU is several times faster with it); the numbers are the same.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, *, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if scheme.act_bits != 8:
            raise ValueError(f"W8A8Linear needs a W8A8 scheme (int8 activations), got {scheme.label}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=dtype))
        self.register_buffer("input_scale", torch.ones(1, dtype=dtype) if self.static else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.cache = False
        self._wt: torch.Tensor | None = None

    @property
    def static(self) -> bool:
        return self.scheme.act_strategy == "tensor"

    @classmethod
    def from_qweight(cls, qw: QuantizedWeight, scheme: QuantScheme | None = None, bias: torch.Tensor | None = None,
                     input_scale: float | torch.Tensor | None = None) -> W8A8Linear:
        """A module holding ``qw`` (8-bit symmetric per channel); scales keep ``qw.scales``' dtype.

        ``scheme`` (default ``qw.scheme``) says dynamic or static; static needs ``input_scale``.
        """
        scheme = scheme or qw.scheme
        if qw.scheme.bits != 8 or qw.scheme.group_size is not None or not qw.scheme.symmetric or qw.g_idx is not None:
            raise ValueError(f"W8A8Linear holds int8 symmetric per-channel weights, got {qw.scheme.label}")
        if not bool((qw.zeros == 128).all()):
            raise ValueError("symmetric int8 weights must have the zero point 128")
        out, inp = qw.shape
        m = cls(inp, out, scheme, bias=bias is not None, dtype=qw.scales.dtype)
        if m.static != (input_scale is not None):
            raise ValueError(f"{scheme.label}: input_scale must be given for static activations, and only then")
        m.weight.copy_((qw.codes.to(torch.int16) - 128).to(torch.int8))
        m.weight_scale.copy_(qw.scales.reshape(out, 1))
        if m.input_scale is not None and input_scale is not None:
            m.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float32).reshape(1))
        if bias is not None and m.bias is not None:
            m.bias.data = bias.detach().clone()
        return m.to(qw.codes.device)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``module.to(dtype)`` would cast the stored scales: move them, but keep their dtypes."""
        dtypes = {k: v.dtype for k, v in self._buffers.items() if v is not None}
        super()._apply(fn, recurse)
        for k, dt in dtypes.items():
            buf = self._buffers[k]
            if buf is not None and buf.dtype != dt:
                self._buffers[k] = buf.to(dt)
        self._wt = None
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat = float(Wq) * s_w`` ``(out, in)``."""
        return (self.weight.to(torch.float32) * self.weight_scale.to(torch.float32)).to(dtype)

    def _operand(self) -> torch.Tensor:
        """``Wq`` as an ``(out, in)`` view of a contiguous ``(in, out)`` tensor (what ``_int_mm`` wants)."""
        wt = self._wt
        if wt is None or wt.device != self.weight.device:
            wt = self.weight.t().contiguous()
            self._wt = wt if self.cache else None
        return wt.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, sx = quantize_act_int8(x.reshape(-1, self.in_features), self.input_scale)
        acc = int8_matmul(xq, self._operand())
        y = acc.to(torch.float32) * sx * self.weight_scale.to(torch.float32).reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label}"


def replace_with_w8a8(model: nn.Module, qweights: dict[str, QuantizedWeight], scheme: QuantScheme, *,
                      input_scales: dict[str, float] | None = None, cache: bool = True) -> nn.Module:
    """Swap each named ``nn.Linear`` for a :class:`W8A8Linear` (biases kept): the in-memory W8A8 model."""
    for name, qw in qweights.items():
        old = model.get_submodule(name)
        bias = getattr(old, "bias", None)
        device = next(old.parameters()).device
        scale = None if input_scales is None or scheme.act_strategy != "tensor" else input_scales[name]
        q = W8A8Linear.from_qweight(qw.to(device), scheme, None if bias is None else bias.detach(), scale)
        q.cache = cache
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, q)
    return model
