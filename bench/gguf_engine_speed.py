"""lowbit compare's GGUF speed figures against llama.cpp's own ``llama-bench`` (pp512, tg128, same threads).

    python bench/gguf_engine_speed.py --llama-bench /tmp/llbuild/bin/llama-bench --model smollm2-135m \
        --types Q8_0 Q4_K_M --threads 2 --out /tmp/gguf-speed

For each type: the GGUF is written once (``lowbit gguf``), then, alternating, ``llama-bench -p 512 -n 128``
and lowbit's measurement (:func:`lowbit.compare.speed.run_speed`, a fresh process on llama-cpp-python) run
``--rounds`` times each; the table gives both medians and their ratio. Both sides decode at the same depth
(after a 512-token prompt) and use llama.cpp's flash attention (llama-bench's default "auto" turns it on).
llama-bench's binary is built from
the llama.cpp source llama-cpp-python vendors (bench/README.md), so both run the same ggml.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lowbit.compare.speed import run_speed
from lowbit.core.io import write_json_atomic
from lowbit.jobs.gguf import export_gguf
from lowbit.models.sources import ensure_source
from peers import machine


def llama_bench(binary: str, gguf: Path, threads: int, reps: int) -> tuple[float, float]:
    """(pp512, tg128 at depth 512) tokens/s, llama-bench's averages over ``reps`` repetitions.

    lowbit decodes its 128 tokens after the 512-token prompt, so llama-bench's tg128 runs at the same depth
    (``-d 512``: the KV cache holds 512 tokens first); its default tg128 starts from an empty cache, about
    10-20% faster on SmolLM2 (attention over 0-128 positions instead of 512-640)."""
    def run(*args: str) -> list[dict]:
        out = subprocess.run([binary, "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json", *args],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    pp = next(r["avg_ts"] for r in run("-p", "512", "-n", "0") if r["n_prompt"] == 512)
    tg = next(r["avg_ts"] for r in run("-p", "0", "-n", "128", "-d", "512") if r["n_gen"] == 128)
    return float(pp), float(tg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bench", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    src = ensure_source(a.model)
    res: dict = {"machine": machine(), "model": a.model, "threads": a.threads, "rows": {}}
    for t in a.types:
        f = out / f"{a.model}-{t}.gguf"
        if not f.is_file():
            export_gguf(str(src), f, t)
        ours_pp, ours_tg, ref_pp, ref_tg = [], [], [], []
        for _ in range(a.rounds):
            pp, tg = llama_bench(a.llama_bench, f, a.threads, a.reps)
            ref_pp.append(pp)
            ref_tg.append(tg)
            s = run_speed(f, "gguf", threads=a.threads, n_prompt=512, n_gen=128, reps=a.reps)
            ours_pp.append(s.prefill_tokens_per_s)
            ours_tg.append(s.decode_tokens_per_s)
        row = {"lowbit_pp512": statistics.median(ours_pp), "llama_bench_pp512": statistics.median(ref_pp),
               "lowbit_tg128": statistics.median(ours_tg), "llama_bench_tg128": statistics.median(ref_tg),
               "raw": {"lowbit_pp": ours_pp, "lowbit_tg": ours_tg, "bench_pp": ref_pp, "bench_tg": ref_tg}}
        row["pp_ratio"] = row["lowbit_pp512"] / row["llama_bench_pp512"]
        row["tg_ratio"] = row["lowbit_tg128"] / row["llama_bench_tg128"]
        res["rows"][t] = row
        write_json_atomic(out / "gguf_engine_speed.json", res)
    tab = Table(title=f"{a.model}, {a.threads} threads: lowbit compare vs llama-bench (tokens/s, medians)")
    for c in ("type", "pp512 lowbit", "pp512 llama-bench", "ratio", "tg128 lowbit", "tg128 llama-bench", "ratio"):
        tab.add_column(c, justify="right")
    for t, r in res["rows"].items():
        tab.add_row(t, f"{r['lowbit_pp512']:.1f}", f"{r['llama_bench_pp512']:.1f}", f"{r['pp_ratio']:.3f}",
                    f"{r['lowbit_tg128']:.1f}", f"{r['llama_bench_tg128']:.1f}", f"{r['tg_ratio']:.3f}")
    Console(width=160).print(tab)


if __name__ == "__main__":
    main()
