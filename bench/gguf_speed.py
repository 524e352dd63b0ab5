"""GGUF encoding speed: lowbit's ``quantize_rows`` vs llama.cpp's ``ggml_quantize_chunk``, tensor by tensor.

    python bench/gguf_speed.py                                   # Qwen2.5-Coder-0.5B, Q4_K_M, 2 threads, CPU
    python bench/gguf_speed.py --imatrix                         # the imatrix paths (random importance)
    python bench/gguf_speed.py --synthetic --device cuda         # random Qwen-shaped tensors, lowbit on a GPU

Every 2-D weight of the model gets the tensor type llama.cpp's Q4_K_M picks for it (``ftypes.plan_types``:
Q4_K; Q6_K for ``attn_v``, half of ``ffn_down`` and the output matrix; Q5_0 / Q8_0 where a row does not fit
256-blocks -- for Qwen2.5-0.5B, whose hidden size 896 is not a multiple of 256, every tensor but ``ffn_down``).
Both sides quantize the same float32 rows on ``--threads`` cores: llama.cpp as ``llama-quantize`` does
(contiguous row ranges, one ``ggml_quantize_chunk`` per thread, called through ctypes from
``tests/gguf_ref.py``), lowbit with its worker processes (numpy, ``cpu_pool``) or on ``--device``.

Correctness first: every tensor's bytes are compared with llama.cpp's before any timing (``exact`` in the
output; a mismatch aborts). Then ``--reps`` timed passes over the whole model, llama.cpp and lowbit
alternating tensor by tensor so both see the same machine load; a tensor's time is the median of its
passes. Prints a table per tensor type and writes JSON to ``--out``
(default ``bench/results/gguf_speed_cpu.json``, ``gguf_speed_<device>.json`` for another device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT / "src", _ROOT / "tests"):
    if str(_p) not in sys.path:  # a plain checkout, without `pip install -e .`; gguf_ref lives in tests/
        sys.path.insert(0, str(_p))

from gguf import GGMLQuantizationType  # noqa: E402

from gguf_ref import ggml_quantize_ref  # noqa: E402
from lowbit.formats.gguf.encode import quantize_rows  # noqa: E402

Q = GGMLQuantizationType
QWEN_0_5B = dict(n_layer=24, hidden=896, ffn=4864, n_head=14, n_kv=2, head_dim=64, vocab=151936)


def model_tensors(model: str, file_type: str) -> list[tuple[str, Q, Any]]:
    """(GGUF name, tensor type, float32 loader) for every quantized tensor, in llama.cpp's order."""
    from lowbit.formats.gguf.convert import HFSource, gguf_tensors
    from lowbit.formats.gguf.ftypes import plan_types
    from lowbit.models.sources import ensure_source

    src = HFSource(ensure_source(model))
    tensors = gguf_tensors(src)
    plan, _ = plan_types({n: t.shape for n, t in tensors.items()}, file_type, src.shape())
    return [(n, plan[n], tensors[n].load) for n in plan if plan[n] != Q.F32]


def synthetic_tensors(file_type: str, seed: int = 0) -> list[tuple[str, Q, Any]]:
    """Random N(0, 0.02) tensors with Qwen2.5-0.5B's GGUF names and shapes (tied embedding), typed by the same
    ``plan_types`` as the real model: no checkpoint needed (the device machines have none)."""
    from lowbit.formats.gguf.ftypes import ModelShape, plan_types

    s = QWEN_0_5B
    kv = s["n_kv"] * s["head_dim"]
    parts = {"attn_q": (s["hidden"], s["hidden"]), "attn_k": (kv, s["hidden"]), "attn_v": (kv, s["hidden"]),
             "attn_output": (s["hidden"], s["hidden"]), "ffn_gate": (s["ffn"], s["hidden"]),
             "ffn_up": (s["ffn"], s["hidden"]), "ffn_down": (s["hidden"], s["ffn"])}
    shapes = {"token_embd.weight": (s["vocab"], s["hidden"])}
    for i in range(s["n_layer"]):
        shapes.update({f"blk.{i}.{part}.weight": shape for part, shape in parts.items()})
    plan, _ = plan_types(shapes, file_type, ModelShape("qwen2", s["n_layer"], s["n_head"], s["n_kv"]))

    def loader(shape: tuple[int, int], k: int) -> Any:
        return lambda: np.random.default_rng(seed + k).standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    return [(n, plan[n], loader(shapes[n], k)) for k, n in enumerate(plan) if plan[n] != Q.F32]


def run(args: argparse.Namespace) -> dict[str, Any]:
    entries = synthetic_tensors(args.ftype) if args.synthetic else model_tensors(args.model, args.ftype)
    data = [(name, t, np.ascontiguousarray(load(), dtype=np.float32)) for name, t, load in entries]
    rng = np.random.default_rng(1)
    imatrix = {name: (rng.random(x.shape[1], dtype=np.float32) * 2) ** 2 if args.imatrix else None
               for name, _, x in data}

    def ours(name: str, t: Q, x: np.ndarray) -> np.ndarray:
        return quantize_rows(x, t, imatrix[name], device=args.device, workers=args.threads)

    def ref(name: str, t: Q, x: np.ndarray) -> np.ndarray:
        return ggml_quantize_ref(x, t, imatrix[name], threads=args.threads)

    t0 = time.perf_counter()
    for name, t, x in data:  # correctness (and warm-up) before timing
        want, got = ref(name, t, x), ours(name, t, x)
        if not np.array_equal(want, got):
            rows = np.nonzero((want != got).any(axis=1))[0]
            raise SystemExit(f"{name} ({t.name}): lowbit's bytes differ from llama.cpp in rows {rows[:10].tolist()}")
    print(f"all {len(data)} tensors byte-identical to llama.cpp ({time.perf_counter() - t0:.1f}s)", flush=True)

    times: dict[str, dict[str, list[float]]] = {name: {"llama.cpp": [], "lowbit": []} for name, _, _ in data}
    for rep in range(args.reps):
        for k, (name, t, x) in enumerate(data):
            order = [("llama.cpp", ref), ("lowbit", ours)]
            for label, fn in order if (rep + k) % 2 == 0 else order[::-1]:
                t1 = time.perf_counter()
                fn(name, t, x)
                times[name][label].append(time.perf_counter() - t1)
        print(f"pass {rep + 1}/{args.reps} done", flush=True)

    per_type: dict[str, dict[str, float]] = defaultdict(lambda: {"tensors": 0, "values": 0, "llama.cpp": 0.0,
                                                                 "lowbit": 0.0})
    tensors = []
    for name, t, x in data:
        med = {label: statistics.median(v) for label, v in times[name].items()}
        tensors.append({"name": name, "type": t.name, "shape": list(x.shape), **{f"{k}_s": v for k, v in med.items()}})
        for key in (t.name, "total"):
            row = per_type[key]
            row["tensors"] += 1
            row["values"] += x.size
            row["llama.cpp"] += med["llama.cpp"]
            row["lowbit"] += med["lowbit"]
    return {"per_type": dict(per_type), "tensors": tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--ftype", default="Q4_K_M")
    ap.add_argument("--synthetic", action="store_true", help="random tensors with Qwen2.5-0.5B's shapes")
    ap.add_argument("--imatrix", action="store_true", help="pass a random importance vector (the _impl paths)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default=None, help="torch device for lowbit (default: CPU, numpy)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = run(args)
    dev = args.device or "cpu"
    out = Path(args.out or _ROOT / "bench" / "results" / f"gguf_speed_{dev.split(':')[0]}.json")
    print(f"\n{'type':8s} {'tensors':>7s} {'Mvalues':>8s} {'llama.cpp s':>12s} {'lowbit s':>9s} {'ratio':>6s}")
    for key, row in sorted(res["per_type"].items(), key=lambda kv: (kv[0] == "total", kv[0])):
        print(f"{key:8s} {row['tensors']:7d} {row['values'] / 1e6:8.1f} {row['llama.cpp']:12.2f} "
              f"{row['lowbit']:9.2f} {row['lowbit'] / row['llama.cpp']:6.2f}")
    meta = {"model": "synthetic Qwen2.5-0.5B shapes" if args.synthetic else args.model, "ftype": args.ftype,
            "imatrix": args.imatrix, "threads": args.threads, "reps": args.reps, "device": dev,
            "timing": "median of reps per tensor, summed; llama.cpp and lowbit alternate per tensor",
            "exact": True, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_avg_after": os.getloadavg(), "python": platform.python_version(), "numpy": np.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **res}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
