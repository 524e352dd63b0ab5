"""``lowbit run``: the main job (quantize the default model several ways, evaluate, report)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.common import console, say, sub, table

EXAMPLES = """\
  lowbit run                         # SmolLM2-135M, about 5 minutes on 2 CPU cores
  lowbit run qwen2.5-coder-0.5b --windows 8 -o runs/qwen"""


def register(subs: Any) -> dict[str, Any]:
    r = sub(subs, "run", "main job: quantize the default model with several schemes, evaluate, report", EXAMPLES)
    r.add_argument("model", nargs="?", default=None, help="model (default: smollm2-135m, offline)")
    r.add_argument("-o", "--out", default=None, help="output folder (default: runs/MODEL)")
    r.add_argument("--data", default=None, help="evaluation corpus: wikitext2 | python-docs | PATH")
    r.add_argument("--protocol", default="gptq", choices=["gptq", "llamacpp"], help="perplexity protocol")
    r.add_argument("--ctx", type=int, default=2048, help="evaluation window in tokens")
    r.add_argument("--windows", type=int, default=3, help="evaluation windows (3 fits 10 minutes on 2 cores)")
    r.add_argument("--calib", default=None, help="calibration: c4 | c4:PATH | python-docs | PATH (default c4)")
    r.add_argument("--calib-samples", type=int, default=16, help="calibration sequences")
    r.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence")
    return {"run": cmd_run}


def cmd_run(a: argparse.Namespace) -> None:
    from lowbit.models.sources import DEFAULT_SOURCE
    from lowbit.run import COLUMNS, run_main, table_rows

    rep = run_main(a.model or DEFAULT_SOURCE, a.out, data=a.data, protocol=a.protocol, ctx=a.ctx,
                   windows=a.windows, calib=a.calib, calib_samples=a.calib_samples, calib_len=a.calib_len,
                   progress=not a.no_progress)
    ev = rep["eval"]
    console.print(table(f"{rep['model']}: {ev['protocol']} ppl on {ev['corpus']}, {ev['windows']}x{ev['ctx']} "
                        f"tokens", list(COLUMNS), table_rows(rep)))
    for n in rep["notes"]:
        say(f"note: {n}")
    out = Path(rep["rows"][1]["path"]).parent if len(rep["rows"]) > 1 else Path(".")
    say(f"report: {out / 'report.md'} and {out / 'report.json'} ({rep['total_seconds']:.0f} s)")
