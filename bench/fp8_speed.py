"""FP8 W8A8 GEMM speed and accuracy on one GPU: bf16 ``F.linear`` vs float8 E4M3 ``torch._scaled_mm``.

    python bench/fp8_speed.py --out OUT            # H100 / H200 (compute capability >= 8.9)
    python bench/fp8_speed.py --dry-run            # CPU smoke test: tiny shapes, fp8 emulated GEMM

Llama-3-8B linear shapes (in -> out): q/o 4096->4096, k/v 4096->1024, gate/up 4096->14336,
down 14336->4096; batch ``M`` in (1, 16, 256) tokens. Random weights ``N(0, 0.02)``, inputs ``N(0, 1)``,
quantized with lowbit (``quantize_fp8``, per-channel bf16 scales). Timed, per shape and M:

* ``bf16``      ``F.linear(x, W)`` in bfloat16 (the baseline);
* ``w8a8``      lowbit's ``FP8Linear`` (FP8_DYNAMIC): dynamic per-token activation quantization
                (eager torch ops) + ``torch._scaled_mm(x8, q^T, scale_a (M,1), scale_b (1,N), out bf16)``;
* ``w8a8_c``    the same two steps under ``torch.compile`` (activation quantization fused);
* ``gemm``      ``torch._scaled_mm`` alone on pre-quantized activations (activation quant excluded);
* ``gemm_fa``   the same with ``use_fast_accum=True``.

Timing: CUDA events around ``--inner`` calls, ``--warmup`` untimed calls first, median of ``--reps``;
weights are cycled over enough copies (>= 2 x 256 MiB) that every call reads them from HBM, not L2.
Accuracy, on the GPU: relative Frobenius error of each output against a float32 reference
``x W^T`` (bf16 operands upcast), and the ``_scaled_mm`` output against lowbit's fp8 emulated GEMM
(the same float8 operands multiplied in float32) -- which should differ by bf16 output rounding only.
Prints a table (ratios: bf16 time / variant time, > 1 is faster) and writes JSON to
``--out`` (default ``$OUT/fp8_speed.json`` when ``OUT`` is set, else ``bench/results/fp8_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:  # the device machine gets a plain working tree, maybe without `pip install -e .`
    sys.path.insert(0, str(_SRC))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowbit.core import fp8_linear  # noqa: E402
from lowbit.core.dtypes import DT_PRESETS  # noqa: E402
from lowbit.core.fp8_linear import FP8Linear, quantize_act_per_token  # noqa: E402
from lowbit.methods.fp8 import quantize_fp8  # noqa: E402

SHAPES = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}
DRY_SHAPES = {"q/o": (128, 128), "k/v": (128, 32), "gate/up": (128, 448), "down": (448, 128)}
VARIANTS = ("bf16", "w8a8", "w8a8_c", "gemm", "gemm_fa")
ROTATE_BYTES = 2 * 256 * 2**20


def timer(fn: Callable[[int], Any], dev: torch.device, warmup: int, reps: int, inner: int) -> float:
    """Median seconds per call of ``fn(i)`` (``i`` picks the weight copy)."""
    for i in range(warmup):
        fn(i)
    times = []
    for r in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)
            start.record()
            for i in range(inner):
                fn(r * inner + i)
            end.record()
            torch.cuda.synchronize(dev)
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for i in range(inner):
                fn(r * inner + i)
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def graph_timer(fn: Callable[[int], Any], dev: torch.device, warmup: int, reps: int, inner: int) -> float:
    """Seconds per call of ``fn`` replayed from one CUDA graph of ``inner`` calls: GPU time, no launch cost."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fn(i)
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(dev)
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def compiled_w8a8() -> Callable[..., torch.Tensor]:
    def f(x: torch.Tensor, w8t: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
        x8, sx = quantize_act_per_token(x)
        return torch._scaled_mm(x8, w8t, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)

    import torch._dynamo

    for knob in ("cache_size_limit", "recompile_limit"):  # one graph per (shape, M): 12 > the default 8
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    return torch.compile(f, dynamic=False)


def variants(x: torch.Tensor, x8: torch.Tensor, sx: torch.Tensor, ws: list[torch.Tensor], mods: list[FP8Linear],
             sw: torch.Tensor, comp: Callable[..., torch.Tensor] | None) -> dict[str, Callable[[int], Any]]:
    """The timed callables; ``i`` selects the weight copy (module docstring)."""
    c = len(ws)
    w8t = [m.weight.t() for m in mods]
    fns: dict[str, Callable[[int], Any]] = {
        "bf16": lambda i: F.linear(x, ws[i % c]),
        "w8a8": lambda i: mods[i % c](x),
        "gemm": lambda i: torch._scaled_mm(x8, w8t[i % c], scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16),
        "gemm_fa": lambda i: torch._scaled_mm(x8, w8t[i % c], scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16,
                                              use_fast_accum=True),
    }
    if comp is not None:
        fns["w8a8_c"] = lambda i: comp(x, w8t[i % c], sw)
    return fns


def bench_shape(name: str, k: int, n: int, ms: list[int], dev: torch.device, a: argparse.Namespace
                ) -> list[dict[str, Any]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    fw = quantize_fp8(w, DT_PRESETS["FP8_DYNAMIC"])
    copies = 1 if a.dry_run else max(1, -(-ROTATE_BYTES // (n * k * 2)))
    ws = [w.to(dev) for _ in range(copies)]
    mods = [FP8Linear.from_weight(fw.to(dev)) for _ in range(copies)]
    sw = fw.scale.float().reshape(1, -1).to(dev)
    comp = compiled_w8a8() if a.compile and dev.type == "cuda" else None
    rows = []
    for m_tok in ms:
        x = torch.randn(m_tok, k, generator=g).to(torch.bfloat16).to(dev)
        x8, sx = quantize_act_per_token(x)
        ref = x.float() @ w.to(dev).float().t()
        fns = variants(x, x8, sx, ws, mods, sw, comp)
        rec: dict[str, Any] = {"shape": name, "in": k, "out": n, "M": m_tok, "weight_copies": copies,
                               "seconds": {}, "rel_err_vs_fp32": {}, "errors": {}}
        with torch.inference_mode():
            for v, fn in fns.items():
                try:
                    rec["rel_err_vs_fp32"][v] = rel(fn(0), ref)
                    rec["seconds"][v] = timer(fn, dev, a.warmup, a.reps, a.inner)
                except Exception as e:  # noqa: BLE001 -- a variant this build cannot run is reported, not fatal
                    rec["errors"][v] = f"{type(e).__name__}: {e}"[:300]
                    continue
                if dev.type == "cuda":  # the same calls replayed from a CUDA graph: GPU time without launches
                    try:
                        rec.setdefault("graph_seconds", {})[v] = graph_timer(fn, dev, a.warmup, a.reps, a.inner)
                    except Exception as e:  # noqa: BLE001
                        rec["errors"][f"{v} (graph)"] = f"{type(e).__name__}: {e}"[:300]
            emulated = mods[0]._emulated_gemm(x8, sx, dev)
            rec["scaled_mm_vs_emulated_rel"] = rel(fns["gemm"](0), emulated) if "gemm" in rec["seconds"] else None
        rec["runtime_path"] = ("scaled_mm" if fp8_linear._scaled_mm_ok(x8, mods[0].weight)
                               else "fp8 emulated GEMM (float32)")
        base = rec["seconds"].get("bf16")
        rec["speedup_vs_bf16"] = {v: base / t for v, t in rec["seconds"].items() if base}
        gbase = rec.get("graph_seconds", {}).get("bf16")
        rec["graph_speedup_vs_bf16"] = {v: gbase / t for v, t in rec.get("graph_seconds", {}).items() if gbase}
        rows.append(rec)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [v for v in VARIANTS if any(v in r["seconds"] for r in rows)]
    graphs = any("graph_seconds" in r for r in rows)
    head = ["shape", "in->out", "M"] + [f"{v} us" for v in cols] + [f"x {v}" for v in cols[1:]]
    if graphs:
        head += [f"{v} us (graph)" for v in cols] + [f"x {v} (graph)" for v in cols[1:]]
    head += [f"err {v}" for v in cols]
    body = []
    for r in rows:
        t, s, e = r["seconds"], r["speedup_vs_bf16"], r["rel_err_vs_fp32"]
        gt, gs = r.get("graph_seconds", {}), r.get("graph_speedup_vs_bf16", {})
        row = ([r["shape"], f"{r['in']}->{r['out']}", str(r["M"])]
               + [f"{t[v] * 1e6:.1f}" if v in t else "-" for v in cols]
               + [f"{s[v]:.2f}" if v in s else "-" for v in cols[1:]])
        if graphs:
            row += [f"{gt[v] * 1e6:.1f}" if v in gt else "-" for v in cols]
            row += [f"{gs[v]:.2f}" if v in gs else "-" for v in cols[1:]]
        body.append(row + [f"{e[v]:.3g}" if v in e else "-" for v in cols])
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="FP8 W8A8 vs bf16 (x = bf16 time / variant time; err = rel. error vs fp32)")
        for h in head:
            table.add_column(h, justify="right")
        for b in body:
            table.add_row(*b)
        Console(width=400).print(table)
    except ImportError:
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        for line in [head, *body]:
            print("  ".join(c.rjust(wd) for c, wd in zip(line, widths, strict=True)))
    for r in rows:
        for v, msg in r["errors"].items():
            print(f"  {r['shape']} M={r['M']} {v}: {msg}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 256], help="batch sizes (tokens)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--inner", type=int, default=20, help="calls between two CUDA events")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few reps: a smoke test of the script")
    default_out = Path(os.environ["OUT"]) / "fp8_speed.json" if os.environ.get("OUT") else \
        Path("bench/results/fp8_speed.json")
    p.add_argument("--out", type=Path, default=default_out)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
    if a.dry_run:
        dev, shapes = torch.device("cpu"), DRY_SHAPES
        a.m, a.warmup, a.reps, a.inner = [m for m in a.m if m <= 16] or [1], 1, 3, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on an H100/H200, or pass --dry-run for the CPU smoke test")
        dev, shapes = torch.device("cuda"), SHAPES
        cap = torch.cuda.get_device_capability(dev)
        if cap < (8, 9):
            sys.exit(f"compute capability {cap} has no FP8 tensor cores (needs >= 8.9: Ada, Hopper, Blackwell)")
    rep: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "torch": torch.__version__,
                           "cuda": torch.version.cuda, "python": platform.python_version(),
                           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
                           or "cpu", "capability": list(torch.cuda.get_device_capability(dev))
                           if dev.type == "cuda" else None, "results": []}
    print(f"device {rep['device']}, torch {torch.__version__}, cuda {torch.version.cuda}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for name, (k, n) in shapes.items():
        rep["results"] += bench_shape(name, k, n, a.m, dev, a)
        a.out.write_text(json.dumps(rep, indent=1))
    rep["scaled_mm_disabled_after_error"] = fp8_linear._SCALED_MM_BROKEN
    a.out.write_text(json.dumps(rep, indent=1))
    print_table(rep["results"])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
