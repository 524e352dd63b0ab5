"""Does ``lowbit compare --strategy fast`` pick what measuring everything picks, measuring at most half?

    python bench/compare_strategy.py --models gemma3-270m qwen2.5-coder-0.5b --out /tmp/cmp-strategy

Per model: one ``--strategy full`` run of the menu (every config fully measured), then, in the same
folder (so nothing is rebuilt), one ``--strategy fast`` run per limit set. Prints, per model and limit
set, both picks and how many configs the fast run measured fully; writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lowbit.compare import Limits, Measure, Options, compare, parse_menu, recommend
from lowbit.core.io import write_json_atomic
from lowbit.pipeline.engine import Engine
from lowbit.recipe import Calibration
from peers import machine


def limit_sets(ref_size: float) -> dict[str, Limits]:
    """Three limit sets: a quality bound, a size bound (45% of the reference), and both."""
    return {"ppl+3%": Limits(max_ppl_increase=3.0), "size<=45%": Limits(max_size=0.45 * ref_size),
            "ppl+10%,size<=35%": Limits(max_ppl_increase=10.0, max_size=0.35 * ref_size)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--menu", default="full")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = {"machine": machine(), "models": {}}
    for model in a.models:
        out = Path(a.out) / model
        base = Options(Calibration("c4", a.calib_samples, 512), Measure(windows=a.windows, speed=not a.no_speed),
                       Limits(), "full", Engine(device="cpu", progress=False))
        t0 = time.perf_counter()
        full = compare(model, parse_menu(None, a.menu), out, base)
        full_s = time.perf_counter() - t0
        ref_size = next(r["size_bytes"] for r in full["rows"] if r["name"] == "reference")
        per = {}
        for label, lim in limit_sets(ref_size).items():
            fast = compare(model, parse_menu(None, a.menu), out, dataclasses.replace(base, limits=lim,
                                                                                     strategy="fast"))
            want = recommend([r for r in full["rows"] if r["measured"] == "full"], lim)
            per[label] = {"full_pick": want.get("name"), "fast_pick": fast["recommendation"].get("name"),
                          "fast_measured": fast["fully_measured"], "menu": fast["menu_size"],
                          "same": want.get("name") == fast["recommendation"].get("name"),
                          "full_reasons": want.get("reasons"), "fast_reasons": fast["recommendation"].get("reasons")}
        results["models"][model] = {"full_seconds": full_s, "limits": per}
        write_json_atomic(Path(a.out) / "compare_strategy.json", results)
    t = Table(title="compare --strategy fast vs full")
    for c in ("model", "limits", "full pick", "fast pick", "same", "fast measured / menu"):
        t.add_column(c)
    for model, r in results["models"].items():
        for label, x in r["limits"].items():
            t.add_row(model, label, str(x["full_pick"]), str(x["fast_pick"]), str(x["same"]),
                      f"{x['fast_measured']} / {x['menu']}")
    Console(width=160).print(t)
    print(json.dumps({m: {k: v["same"] for k, v in r["limits"].items()} for m, r in results["models"].items()}))


if __name__ == "__main__":
    main()
