"""Hessian accumulation ``S += X^T X`` on a GPU: the full product against row panels (lower block
triangle only, mirrored once when ``H`` is read), for the input widths of a Llama-3-8B block.

    PYTHONPATH=src python bench/hessian_panels.py [--tokens 2048] [--updates 128] [--out DIR]

Per width: milliseconds per update and for the whole run (updates + the final read of ``H``) for
each panel height, the ratio against the full product in the same run, the floor (the products'
FLOPs at the measured bf16 matmul rate), and the relative difference (Frobenius) of ``H`` between the two
(both sum bf16 products in fp32; only the GEMM tiling differs). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lowbit.pipeline.hessian import HessianObserver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_speed import bf16_matmul_rate  # noqa: E402


def run(width: int, rows: int | None, xs: list[torch.Tensor]) -> tuple[float, torch.Tensor, int]:
    """Seconds for the updates and the first read of ``H``, ``H``, and the number of panels used."""
    obs = HessianObserver(width, "cuda", panel_rows=rows)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x in xs:
        obs.update(x)
    H = obs.H
    torch.cuda.synchronize()
    return time.perf_counter() - t0, H, len(obs._panels or [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per update (one 2048-token sample)")
    p.add_argument("--updates", type=int, default=128)
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 14336])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    rate = bf16_matmul_rate(torch.device("cuda"))
    rows_out = []
    print(f"{torch.cuda.get_device_name()}, bf16 matmul {rate / 1e12:.0f} TFLOP/s; "
          f"{a.updates} updates of {a.tokens} tokens")
    print(f"{'width':>6} {'panel rows':>10} {'ms/update':>10} {'total s':>8} {'vs full':>8} {'floor s':>8} "
          f"{'rel diff':>12}")
    for w in a.widths:
        g = torch.Generator(device="cuda").manual_seed(0)
        xs = [torch.randn(a.tokens, w, device="cuda", generator=g).bfloat16() for _ in range(a.updates)]
        run(w, w, xs[:4])  # warm-up (cuBLAS heuristics, workspace)
        run(w, None, xs[:4])
        full = run(w, w, xs)
        base, Hf = full[0], full[1]
        for rows in (w, None, 1024):
            if rows == 1024 and w < 4096:
                continue
            t, H, k = full if rows == w else run(w, rows, xs)
            frac = k * (k + 1) / 2 / (k * k)
            floor = frac * 2 * a.tokens * w * w * a.updates / rate
            diff = float((H - Hf).norm() / Hf.norm())
            label = "full" if rows == w else f"auto ({k})" if rows is None else f"{rows} ({k})"
            rows_out.append({"width": w, "panel_rows": rows, "panels": k, "seconds": t,
                             "ms_per_update": t / a.updates * 1e3, "vs_full": t / base, "floor_s": floor,
                             "rel_diff_norm": diff})
            print(f"{w:>6} {label:>10} {t / a.updates * 1e3:>10.3f} {t:>8.3f} {t / base:>8.3f} {floor:>8.3f} "
                  f"{diff:>12.2e}")
        del xs
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "hessian_panels.json.tmp"
    tmp.write_text(json.dumps({"device": torch.cuda.get_device_name(), "bf16_flops": rate, "args": vars(a),
                               "rows": rows_out}, indent=1))
    tmp.replace(out / "hessian_panels.json")


if __name__ == "__main__":
    main()
