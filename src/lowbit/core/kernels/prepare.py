"""Prepare a loaded lowbit model for a device: swap each ``QuantLinear`` for a kernel-backed linear.

Backends, tried in order for each layer (the first that supports it wins; ``backend=`` forces one)::

    device   backend    module                 kernel
    cuda     triton     TritonWxA16Linear      Triton GEMV (M = 1) / GEMM (M > 1), 4 and 8 bits
    cpu      cpu-int4   CPUInt4Linear          torch _weight_int4pack_mm_for_cpu
    cpu      cpu-int8   CPUInt8Linear          torch _weight_int8pack_mm
    any      dequant    QuantLinear (kept)     dequantize, then one dense matmul (the fallback)

Every layer that falls back is named with the reason in the returned :class:`KernelReport`, and
the summary is logged: the runtime always says which kernel it uses.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.kernels import configs, cpu_linear, triton_linear
from lowbit.core.qlinear import QuantLinear

log = logging.getLogger(__name__)

Builder = Callable[[QuantLinear, torch.device, torch.dtype], nn.Module]


@dataclass(frozen=True)
class Backend:
    name: str
    device_type: str
    bits: tuple[int, ...]
    unsupported: Callable[[QuantLinear, torch.device], str | None]
    build: Builder


def _triton_unsupported(q: QuantLinear, dev: torch.device) -> str | None:
    return triton_linear.unsupported(q, dev)


BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", "cuda", (4, 8), _triton_unsupported,
                      lambda q, dev, dt: triton_linear.TritonWxA16Linear.from_quant_linear(q, dev)),
    "cpu-int4": Backend("cpu-int4", "cpu", (4,), lambda q, dev: cpu_linear.unsupported_int4(q),
                        lambda q, dev, dt: cpu_linear.CPUInt4Linear(q, cpu_linear.kernel_dtype(dt))),
    "cpu-int8": Backend("cpu-int8", "cpu", (8,), lambda q, dev: cpu_linear.unsupported_int8(q),
                        lambda q, dev, dt: cpu_linear.CPUInt8Linear(q, cpu_linear.kernel_dtype(dt))),
}


@dataclass
class KernelReport:
    """Which kernel each quantized linear uses on ``device`` (``dequant: reason`` for the fallbacks)."""

    device: str
    layers: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return dict(Counter(v.split(":")[0] for v in self.layers.values()))

    def summary(self) -> str:
        parts = [f"{n} {b}" for b, n in sorted(self.counts().items())]
        reasons = sorted({v.split(": ", 1)[1] for v in self.layers.values() if v.startswith("dequant: ")})
        why = f" (dequantized because: {'; '.join(reasons)})" if reasons else ""
        return f"lowbit kernels on {self.device}: {', '.join(parts) or 'no quantized linears'}{why}"


def choose_backend(q: QuantLinear, device: torch.device, backend: str = "auto") -> tuple[str, str | None]:
    """``(backend name, None)`` or ``("dequant", reason)`` for one layer."""
    if backend == "dequant":
        return "dequant", "asked for"
    bits = q.scheme.bits
    names = ([n for n, b in BACKENDS.items() if b.device_type == device.type and bits in b.bits]
             if backend == "auto" else [backend])
    if backend == "triton" and triton_linear.interpreting():
        names = ["triton"]  # tests: the interpreter runs the Triton kernels on CPU tensors
    reasons = []
    for n in names:
        b = BACKENDS.get(n)
        if b is None:
            raise LowbitError(f"unknown kernel backend {n!r}; choose one of {['auto', 'dequant', *BACKENDS]}")
        why = b.unsupported(q, device)
        if why is None:
            return n, None
        reasons.append(f"{n}: {why}")
    return "dequant", "; ".join(reasons) or f"no {device.type} kernel for {bits}-bit weights"


def prepare_model(model: nn.Module, device: torch.device | str, *, dtype: torch.dtype | None = None,
                  backend: str = "auto", int8_head: bool = False) -> KernelReport:
    """Move ``model`` to ``device`` (and ``dtype``), each ``QuantLinear`` replaced by the fastest kernel there.

    ``backend``: ``auto`` (per device, see the module table), a backend name to force (layers it
    cannot run fall back to ``dequant``), or ``dequant``. ``int8_head``: also quantize the output
    projection (``lm_head``, which artifacts keep in 16 bits) to int8 per channel at load, an
    approximation beyond the artifact (off by default; :func:`int8_linear`). Returns the per-layer
    :class:`KernelReport` (also logged) and stores it as ``model.lowbit_kernels``.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    report = KernelReport(str(dev))
    compute = dtype or _float_dtype(model)
    if int8_head:
        head = model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(head, nn.Linear):
            raise LowbitError(f"int8_head: the output projection is a {type(head).__name__}, not an nn.Linear")
        model.set_output_embeddings(int8_linear(head))  # type: ignore[operator]
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear):
            continue
        chosen, why = choose_backend(mod, dev, backend)
        if chosen == "dequant":
            report.layers[name] = f"dequant: {why}"
            continue
        new = BACKENDS[chosen].build(mod, dev, compute)
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, new)
        report.layers[name] = chosen
    model.to(device=dev, dtype=dtype) if dtype is not None else model.to(dev)
    model.lowbit_kernels = report  # type: ignore[assignment]
    log.info(report.summary())
    return report


def int8_linear(lin: nn.Linear) -> QuantLinear:
    """``lin`` as a W8A16 per-channel symmetric :class:`QuantLinear`: ``s = max_j |W_rj| / 127``,
    ``q = clamp(round(W / s), -128, 127) + 128`` (error at most ``s / 2`` a weight)."""
    from lowbit.core.qweight import QuantizedWeight
    from lowbit.core.scheme import QuantScheme

    w = lin.weight.detach().float()
    s = (w.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (torch.round(w / s).clamp(-128, 127) + 128).to(torch.uint8)
    scheme = QuantScheme(8, None, True)
    qw = QuantizedWeight(codes, s.to(lin.weight.dtype), torch.full_like(codes[:, :1], 128), scheme)
    return QuantLinear.from_qweight(qw, lin.bias, dtype=lin.weight.dtype)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.bfloat16


def warm_up(model: nn.Module, rows: tuple[int, ...] = (1,), timer: Callable | None = None) -> dict[str, str]:
    """Tune the Triton configurations of every distinct layer shape for each ``rows`` count (CUDA only).

    Run before capturing CUDA graphs; ``timer(fn) -> seconds`` defaults to Triton's ``do_bench``
    median (5 ms warm-up, 20 ms of repeats). Returns ``{shape/rows: chosen config}``.
    """
    if timer is None:
        from triton.testing import do_bench

        def timer(fn: Callable[[], None]) -> float:
            return float(do_bench(fn, warmup=5, rep=20, return_mode="median")) / 1e3

    seen: dict[str, str] = {}
    for mod in model.modules():
        if not isinstance(mod, triton_linear.TritonWxA16Linear) or mod.packed.device.type != "cuda":
            continue
        for m in rows:
            key = f"{mod.out_features}x{mod.in_features} {mod.scheme.label} M={m}"
            tuned = configs.has(mod.packed.device, m, mod.out_features, mod.in_features, mod.scheme.bits,
                                mod.gs_class)
            if key not in seen and not tuned:
                cfg, t = mod.tune(m, timer)
                seen[key] = f"{cfg} {t * 1e6:.1f} us"
    return seen
