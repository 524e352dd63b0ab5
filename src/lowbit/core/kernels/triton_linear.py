"""Runtime linear computing with lowbit's 4- and 8-bit weights through the Triton kernels.

Built once at load from a :class:`~lowbit.core.qlinear.QuantLinear` (the compressed-tensors
``pack-quantized`` buffers): the codes are repacked bit for bit into the tile layout
(:mod:`lowbit.core.kernels.tiles`), scales and zero points transposed to ``(G, N)`` so that a
program's rows read them contiguously. Buffers (``W (N, K)``, ``G`` groups, ``Kp`` = K padded to
whole tiles)::

    packed  (N, Kp * b / 32)  int32   tile-interleaved codes
    scales  (G, N)            float   the artifact's scale dtype
    zeros   (G, N)            float   integer zero points (exact in bf16/fp16); (0, N) when symmetric
    bias    (N,)              float   optional

Forward: ``x (..., K)`` bf16/fp16 on CUDA -> GEMV for one row, GEMM for more
(:mod:`lowbit.core.kernels.triton_wxa16`); any other input (float32, CPU tensors outside
Triton's interpreter) takes the dequantized matmul, the same math as ``QuantLinear``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.kernels import configs
from lowbit.core.kernels import triton_wxa16 as tw
from lowbit.core.kernels.tiles import KERNEL_BITS, padded_k, repack_ct, unpack_tiles
from lowbit.core.qlinear import QuantLinear
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme

_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
WS_MAX_M = 64  # split-K runs only for M <= 64 (configs.default_config); its workspace holds M x N floats


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported(q: QuantLinear, device: torch.device) -> str | None:
    """Why the Triton kernels cannot run this layer on ``device`` (None when they can)."""
    if not tw.HAVE_TRITON:
        return "triton is not installed"
    if device.type != "cuda" and not interpreting():
        return f"the Triton kernels run on CUDA devices, not {device.type}"
    if q.scheme.bits not in KERNEL_BITS:
        return f"{q.scheme.bits}-bit codes (the kernels read 4 or 8)"
    if q.scheme.act_bits:
        return "int8 activations (W8A8 has its own runtime)"
    if q.weight_g_idx.numel():
        return "act-order g_idx (groups not contiguous along K)"
    gs = q.scheme.group_size
    if gs is not None and gs % 32:
        return f"group size {gs} (the kernels need a multiple of 32)"
    if gs is None and q.in_features % 32:
        return f"in_features {q.in_features} (per-channel kernels need a multiple of 32)"
    return None


def workspace(device: torch.device, numel: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K float32 workspace and int32 counters of ``device`` (zero between launches)."""
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or cnt is None or ws.numel() < numel or cnt.numel() < counters:
        ws = torch.zeros(max(numel, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(counters, 1 << 12), dtype=torch.int32, device=device)
        _WORKSPACE[device] = (ws, cnt)
    return ws, cnt


class TritonWxA16Linear(nn.Module):
    """Drop-in ``nn.Linear`` computing with 4- or 8-bit weights through Triton (see the module docstring)."""

    backend = "triton"
    dequantized = False  # what lowbit.compare.speed reads
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, *, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        bits = scheme.bits
        groups = scheme.n_groups(in_features)
        words = padded_k(in_features, bits) * bits // 32
        self.register_buffer("packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=dtype, device=device))
        zrows = 0 if scheme.symmetric else groups
        self.register_buffer("zeros", torch.zeros(zrows, out_features, dtype=dtype, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_quant_linear(cls, q: QuantLinear, device: torch.device | str) -> TritonWxA16Linear:
        """Repack ``q`` on ``device`` (bit for bit: :func:`tiles.repack_ct`)."""
        sdt = q.weight_scale.dtype if q.weight_scale.dtype in (torch.bfloat16, torch.float16) else torch.float32
        m = cls(q.in_features, q.out_features, q.scheme, bias=q.bias is not None, dtype=sdt, device="meta")
        dev = torch.device(device)
        m.packed = repack_ct(q.weight_packed.to(dev), q.scheme.bits, q.in_features)
        m.scales = q.weight_scale.to(dev, sdt).t().contiguous()
        m.zeros = (q.weight_zero.to(dev).t().to(sdt).contiguous() if not q.scheme.symmetric
                   else torch.zeros(0, q.out_features, dtype=sdt, device=dev))
        if q.bias is not None:
            m.bias = nn.Parameter(q.bias.detach().to(dev), requires_grad=False)
        return m

    def qweight(self) -> QuantizedWeight:
        """The canonical unpacked weight (for checks and the dequantized fallback)."""
        codes = unpack_tiles(self.packed, self.scheme.bits, self.in_features)
        zeros = (self.zeros.t().to(torch.uint8) if self.zeros.numel()
                 else torch.full_like(self.scales.t(), self.scheme.sym_zero, dtype=torch.uint8))
        return QuantizedWeight(codes, self.scales.t(), zeros, self.scheme)

    @property
    def kernel_name(self) -> str:
        return f"lowbit Triton W{self.scheme.bits}A16 GEMV/GEMM"

    @property
    def group_size(self) -> int:
        """The kernels' group size: ``Kp`` (one group) per channel."""
        gs = self.scheme.group_size
        return padded_k(self.in_features, self.scheme.bits) if gs is None else gs

    @property
    def gs_class(self) -> str:
        return f"{'s' if self.scheme.symmetric else 'a'}{self.scheme.group_size or 0}"

    def run(self, x2: torch.Tensor, y: torch.Tensor, cfg: configs.Config) -> None:
        """One kernel launch for ``x2 (M, K)`` into ``y (M, N)`` with ``cfg``."""
        m, n = x2.shape[0], self.out_features
        ws, cnt = workspace(x2.device, WS_MAX_M * n, -(-n // 8) * -(-WS_MAX_M // 16))
        zeros = self.zeros if self.zeros.numel() else None
        common = dict(bits=self.scheme.bits, gs=self.group_size, k=self.in_features)
        if isinstance(cfg, configs.GemvConfig):
            tw.launch_gemv(x2, self.packed, self.scales, zeros, self.bias, y, ws, cnt, bn=cfg.bn, u=cfg.u,
                           split=cfg.split if m * n <= ws.numel() else 1, num_warps=cfg.warps,
                           num_stages=cfg.stages, **common)
        else:
            split = cfg.split if m <= WS_MAX_M else 1
            tw.launch_gemm(x2, self.packed, self.scales, zeros, self.bias, y, ws, cnt, bm=cfg.bm, bn=cfg.bn,
                           split=split, num_warps=cfg.warps, num_stages=cfg.stages, **common)

    def config(self, m: int, device: torch.device) -> configs.Config:
        cfg = configs.pick(device, m, self.out_features, self.in_features, self.scheme.bits, self.gs_class)
        if m > 1 and isinstance(cfg, configs.GemvConfig):  # a tuned GEMV entry never serves several rows
            return configs.GemmConfig()
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.bfloat16, torch.float16) or (x.device.type != "cuda" and not interpreting()):
            w = self.qweight().dequantize(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1 or (x2.shape[0] == 1 and not x2.is_contiguous()):
            x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            self.run(x2, y, self.config(x2.shape[0], x.device))
        return y.view(*lead, self.out_features)

    def tune(self, m: int, timer) -> tuple[configs.Config, float]:  # type: ignore[no-untyped-def]
        """Time the candidate configurations for ``m`` rows on this layer's device; keep the fastest."""
        dev = self.packed.device
        x2 = torch.randn(m, self.in_features, device=dev, dtype=self.scales.dtype
                         if self.scales.dtype != torch.float32 else torch.bfloat16)
        y = torch.empty(m, self.out_features, device=dev, dtype=x2.dtype)
        return configs.tune(dev, m, self.out_features, self.in_features, self.scheme.bits, self.gs_class,
                            lambda cfg: self.run(x2, y, cfg), timer)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.label}, "
                f"backend={self.backend}")
