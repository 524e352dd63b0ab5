"""``lowbit compare`` and ``lowbit run``: quantize a model every way on a menu, measure, recommend one."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.cli.common import console, say, sub, table
from lowbit.core.errors import LowbitError

EXAMPLES = """\
  lowbit compare gemma3-270m -o cmp/gemma                              # the default menu, CPU
  lowbit compare qwen2.5-coder-0.5b --menu full --strategy fast --max-ppl-increase 3 -o cmp/qwen
  lowbit compare ./my-model --configs W4A16:gptq,W4A16:awq,gguf:Q4_K_M,NF4 --max-size 0.4 -o cmp/mine
  lowbit compare ./my-model --configs W4A16:gptq,my_recipe.yaml --tasks arc_easy,hellaswag -o cmp/mine"""
RUN_EXAMPLES = """\
  lowbit run                          # SmolLM2-135M, the default menu, under 10 minutes on 2 CPU cores
  lowbit run gemma3-270m -o runs/gemma"""


def _common(p: argparse.ArgumentParser, run: bool) -> None:
    g = p.add_argument_group("what to compare")
    if not run:
        g.add_argument("--configs", default=None, help="comma-separated configs: W4A16:gptq, W8A16, NF4, INT8-LLM, "
                       "FP8, gguf:Q4_K_M, gguf:Q4_K_M+imatrix, mix@4.5, a recipe file ...")
        g.add_argument("--menu", default=None, help="default | full | FILE (one config per line); default: default")
        g.add_argument("--strategy", default="full", choices=["full", "fast"],
                       help="fast: score every config on one window, measure fully only the promising ones")
    lim = p.add_argument_group("limits (the recommendation)")
    lim.add_argument("--max-size", type=float, default=None, metavar="GB", help="artifact size on disk")
    lim.add_argument("--max-memory", type=float, default=None, metavar="GB", help="peak memory while decoding")
    lim.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                     help="perplexity increase over the reference, percent (default 5 when no limit is given)")
    lim.add_argument("--min-decode-tps", type=float, default=None, metavar="N", help="decode tokens/s, batch 1")
    m = p.add_argument_group("measurement")
    m.add_argument("--data", default=None, help="evaluation text (default wikitext2 when found)")
    m.add_argument("--windows", type=int, default=3 if run else 8, help="evaluation windows of --ctx tokens")
    m.add_argument("--ctx", type=int, default=2048, help="evaluation window in tokens")
    m.add_argument("--tasks", default=None, help="zero-shot tasks too, e.g. arc_easy,hellaswag")
    m.add_argument("--task-limit", type=int, default=None, help="first N documents of each task")
    m.add_argument("--calib", default=None, help="calibration text (default c4)")
    m.add_argument("--calib-samples", type=int, default=16 if run else 32, help="calibration sequences")
    m.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence")
    m.add_argument("--device", default="cpu", help="where quantization and timing run: cpu, cuda, auto")
    m.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    m.add_argument("--no-speed", action="store_true", help="skip the speed and memory measurements")
    m.add_argument("--reps", type=int, default=2 if run else 3, help="timed prefills per config (median)")
    m.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per config")
    m.add_argument("--qat-steps", type=int, default=300, help="training steps of ...+qat configs (on --calib)")


def register(subs: Any) -> dict[str, Any]:
    c = sub(subs, "compare", "quantize a model with every method on a menu, measure quality, speed and memory "
            "on this machine, and recommend one", EXAMPLES)
    c.add_argument("model", help="offline source name, model folder, .gguf file or hub id")
    c.add_argument("-o", "--out", required=True, help="results folder (an earlier compare there is resumed)")
    _common(c, run=False)
    r = sub(subs, "run", "main job: lowbit compare on the default model and menu, sized for 10 minutes on 2 cores",
            RUN_EXAMPLES)
    r.add_argument("model", nargs="?", default=None, help="model (default: smollm2-135m, offline)")
    r.add_argument("-o", "--out", default=None, help="results folder (default: runs/MODEL)")
    _common(r, run=True)
    return {"compare": cmd_compare, "run": cmd_run}


def _options(a: argparse.Namespace, strategy: str) -> Any:
    from lowbit.compare import Limits, Measure, Options
    from lowbit.pipeline.engine import Engine
    from lowbit.recipe.schema import Calibration

    for flag, v in (("--windows", a.windows), ("--ctx", a.ctx), ("--calib-samples", a.calib_samples),
                    ("--calib-len", a.calib_len), ("--reps", a.reps), ("--new-tokens", a.new_tokens),
                    ("--qat-steps", a.qat_steps)):
        if v < 1:
            raise LowbitError(f"{flag} must be >= 1, got {v}")
    if a.ctx < 2:
        raise LowbitError(f"--ctx must be >= 2 tokens (a window scores its next tokens), got {a.ctx}")
    for flag, v in (("--task-limit", a.task_limit), ("--threads", a.threads)):
        if v is not None and v < 1:
            raise LowbitError(f"{flag} must be >= 1, got {v}")
    for flag, v in (("--max-size", a.max_size), ("--max-memory", a.max_memory),
                    ("--max-ppl-increase", a.max_ppl_increase), ("--min-decode-tps", a.min_decode_tps)):
        if v is not None and (v < 0 or (v == 0 and flag != "--max-ppl-increase")):
            raise LowbitError(f"{flag} must be {'>= 0' if flag == '--max-ppl-increase' else '> 0'}, got {v}")
    lim = Limits(None if a.max_size is None else a.max_size * 1e9, None if a.max_memory is None else a.max_memory * 1e9,
                 a.max_ppl_increase, a.min_decode_tps)
    tasks = tuple(t for t in (a.tasks or "").split(",") if t)
    meas = Measure(data=a.data, ctx=a.ctx, windows=a.windows, tasks=tasks, task_limit=a.task_limit, n_gen=a.new_tokens,
                   reps=a.reps, speed=not a.no_speed)
    eng = Engine(device=a.device, progress=not a.no_progress, threads=a.threads)
    eng.resolved_device()
    return Options(Calibration(a.calib, a.calib_samples, a.calib_len), meas, lim, strategy, eng, a.qat_steps)


def _check(a: argparse.Namespace) -> None:
    from lowbit.data import resolve_calib_texts
    from lowbit.jobs.evaluate import eval_text
    from lowbit.models.loader import check_spec

    check_spec(a.model)
    eval_text(a.data, 1 << 16)
    if a.calib:
        resolve_calib_texts(a.calib)
    if a.tasks:
        from lowbit.eval.tasks import load_tasks

        load_tasks([a.tasks], a.task_limit)  # names, files and layouts, before any model loads


def _show(rep: dict[str, Any]) -> None:
    from lowbit.compare.report import COLUMNS, table_rows

    ev = rep["eval"]
    console.print(table(f"{rep['model']}: {ev['protocol']} perplexity on {ev['corpus']}, {ev['windows']} x {ev['ctx']} "
                        f"tokens; speed on {rep['speed']['device']}", list(COLUMNS), table_rows(rep)))
    rec = rep["recommendation"]
    if rec.get("name"):
        say(f"recommended: {rec['name']}: {rec['reasons']}")
        if rec.get("runner_up"):
            say(f"runner-up: {rec['runner_up']['name']}: {rec['runner_up']['reasons']}")
    else:
        say(f"no recommendation: {rec['reasons']}")
    for n in rep.get("notes", []):
        say(f"note: {n}")


def cmd_compare(a: argparse.Namespace) -> None:
    from pathlib import Path

    from lowbit.compare import compare, parse_menu

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    configs = parse_menu(a.configs, a.menu)
    opts = _options(a, a.strategy)
    _check(a)
    rep = compare(a.model, configs, a.out, opts)
    _show(rep)
    say(f"report: {Path(a.out) / 'report.html'} (and report.md, report.json) in {rep['total_seconds']:.0f} s")


def cmd_run(a: argparse.Namespace) -> None:
    import dataclasses
    from pathlib import Path

    from lowbit.compare import compare, parse_menu
    from lowbit.models.sources import DEFAULT_SOURCE

    model = a.model or DEFAULT_SOURCE
    out = a.out or str(Path("runs") / Path(model).name)
    opts = dataclasses.replace(_options(a, "full"), quick=True)
    a.model = model
    _check(a)
    rep = compare(model, parse_menu(None, "default"), out, opts)
    _show(rep)
    say(f"report: {Path(out) / 'report.html'} (and report.md, report.json) in {rep['total_seconds']:.0f} s")
