"""The threshold gate's flags, shared by ``lowbit quantize`` and ``lowbit qat``."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.core.errors import LowbitError


def add_gate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("threshold gate (the artifact, evaluated from disk, reaches -o only if it passes)")
    g.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                   help="largest perplexity increase over the source model, in percent (pinned gptq protocol)")
    g.add_argument("--min-task-acc", action="append", default=None, metavar="TASK=ACC",
                   help="smallest zero-shot accuracy, e.g. arc_easy=0.55 or arc_easy=55%% (repeatable)")
    g.add_argument("--data", default=None, help="the gate's evaluation text: wikitext2 | python-docs | PATH | "
                                                "hf:NAME[:CONFIG[:SPLIT]] (default wikitext2 when found)")
    g.add_argument("--eval-windows", type=int, default=None, metavar="N",
                   help="evaluate the first N windows only (default: the whole corpus)")
    g.add_argument("--eval-ctx", type=int, default=2048, help="window of the perplexity protocol, in tokens")
    g.add_argument("--task-limit", type=int, default=None, metavar="N", help="documents per task (default all)")


def gate_from_args(a: argparse.Namespace) -> Any:
    from lowbit.jobs.gate import Gate, check_gate, parse_task_threshold

    for flag, v in (("--eval-windows", a.eval_windows), ("--task-limit", a.task_limit)):
        if v is not None and v < 1:
            raise LowbitError(f"{flag} must be >= 1, got {v}")
    if a.eval_ctx < 2:
        raise LowbitError(f"--eval-ctx must be >= 2 tokens, got {a.eval_ctx}")
    gate = Gate(a.max_ppl_increase, dict(parse_task_threshold(s) for s in a.min_task_acc or ()), a.data, a.eval_ctx,
                a.eval_windows, a.task_limit)
    if gate.active:
        check_gate(gate)
    return gate


def describe(report: dict[str, Any] | None) -> str:
    """One line for a passed gate's report ("" without a gate)."""
    if not report:
        return ""
    parts = []
    if "perplexity" in report:
        p = report["perplexity"]
        parts.append(f"perplexity {p['artifact']:.3f} vs {p['reference']:.3f} ({p['increase_pct']:+.2f}%, "
                     f"{p['corpus']}, {p['windows']} windows of {p['ctx']})")
    for t, r in report.get("tasks", {}).items():
        parts.append(f"{t} {r['artifact']:.4f} (reference {r['reference']:.4f})")
    return "gate passed: " + "; ".join(parts)
