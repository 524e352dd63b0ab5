"""WikiText-2 perplexity and KLD of every default scheme of `lowbit run`, on real models.

    python bench/quality.py --models smollm2-135m gemma3-270m --windows 40 --out bench/results

For each model: quantize with W8A16 RTN, W4A16 RTN and W4A16 importance-weighted RTN, write the
artifacts, load them back from disk, and score them against the bf16 reference on the first
``--windows`` windows of 2048 tokens (GPTQ protocol). Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lowbit.core.io import write_json_atomic
from lowbit.run import COLUMNS, run_main, table_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(a.out)
    reports = {}
    t0 = time.perf_counter()
    for m in a.models:
        reports[m] = run_main(m, out / m, windows=a.windows, ctx=a.ctx, calib_samples=a.calib_samples,
                              calib_len=a.calib_len, progress=False)
    table = Table(title=f"WikiText-2, gptq protocol, first {a.windows} windows of {a.ctx} tokens")
    for c in ("model", *COLUMNS):
        table.add_column(c)
    for m, rep in reports.items():
        for row in table_rows(rep):
            table.add_row(m, *row)
    Console(width=200).print(table)
    summary = {"windows": a.windows, "ctx": a.ctx, "seconds": time.perf_counter() - t0,
               "reports": {m: {k: v for k, v in r.items() if k != "machine"} | {"machine": r["machine"]}
                           for m, r in reports.items()}}
    write_json_atomic(out / "quality.json", summary)
    print(json.dumps({m: [(r["name"], round(r["ppl"], 4), r["kld"]) for r in rep["rows"]]
                      for m, rep in reports.items()}))


if __name__ == "__main__":
    main()
