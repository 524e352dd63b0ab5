"""The threshold gate: an artifact reaches its output path only if, evaluated from disk, it meets its thresholds.

A job that is gated writes its artifact to a staging folder beside ``OUT`` (``.OUT.gate-pending``), then::

    ppl increase = 100 * (ppl_artifact / ppl_reference - 1)        % (pinned gptq protocol, same windows)
    task drop    = acc_reference - acc_artifact per task named     (zero-shot tasks, when this build has them)

pass: the staging folder is renamed to ``OUT``. Fail: it is renamed to ``OUT.failed-gate`` (``-2``, ``-3`` ...
when taken), so nothing appears at ``OUT``, and :class:`GateFailed` says by how much each threshold was
missed (the CLI exits 3). Either way the artifact holds the verdict as ``gate.json``.

Tasks (``TASK=ACC``) are scored by :mod:`lowbit.eval.tasks` (lm-eval's zero-shot scoring) when it is part of
this build; :func:`check_gate` refuses them up front otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.io import check_output_dir, fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

GATE_FILE = "gate.json"
FAILED_SUFFIX = ".failed-gate"
T = TypeVar("T")


class GateFailed(LowbitError):
    """The artifact missed a threshold; it was kept aside at ``path``."""

    exit_code = 3

    def __init__(self, message: str, path: Path, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.path, self.report = path, report


@dataclass(frozen=True)
class Gate:
    """Thresholds and how they are measured. ``max_ppl_increase``: percent over the reference's perplexity;
    ``min_task_acc``: ``{task: accuracy in [0, 1]}``; ``data``/``ctx``/``max_windows``: the perplexity corpus,
    window and number of windows (None: the whole corpus); ``task_limit``: documents per task."""

    max_ppl_increase: float | None = None
    min_task_acc: dict[str, float] = field(default_factory=dict)
    data: str | None = None
    ctx: int = 2048
    max_windows: int | None = None
    task_limit: int | None = None

    @property
    def active(self) -> bool:
        return self.max_ppl_increase is not None or bool(self.min_task_acc)


def parse_task_threshold(spec: str) -> tuple[str, float]:
    """``TASK=ACC`` (``arc_easy=0.55`` or ``arc_easy=55%``) -> ``(task, fraction)``."""
    task, sep, val = spec.partition("=")
    if not sep or not task or not val:
        raise LowbitError(f"--min-task-acc {spec!r}: expected TASK=ACC, e.g. arc_easy=0.55 or arc_easy=55%")
    try:
        acc = float(val.rstrip("%")) / (100 if val.endswith("%") else 1)
    except ValueError:
        raise LowbitError(f"--min-task-acc {spec!r}: {val!r} is not a number") from None
    if not 0 <= acc <= 1:
        raise LowbitError(f"--min-task-acc {spec!r}: accuracy must lie in [0, 1] (or 0%..100%)")
    return task, acc


def _tasks_module() -> Any:
    try:
        from lowbit.eval import tasks  # type: ignore[attr-defined]
    except ImportError:
        return None
    return tasks


def check_gate(gate: Gate) -> None:
    """Every check of the gate that needs no model: thresholds, the corpus, the tasks' availability."""
    from lowbit.jobs.evaluate import eval_text

    if gate.max_ppl_increase is not None and gate.max_ppl_increase < 0:
        raise LowbitError(f"--max-ppl-increase must be >= 0 (percent), got {gate.max_ppl_increase}")
    if gate.ctx < 2 or (gate.max_windows is not None and gate.max_windows < 1):
        raise LowbitError("the gate's window must be >= 2 tokens and its number of windows >= 1")
    if gate.max_ppl_increase is not None:
        eval_text(gate.data)
    if gate.min_task_acc:
        mod = _tasks_module()
        if mod is None:
            raise LowbitError("--min-task-acc needs lowbit's zero-shot tasks (lowbit.eval.tasks), which this build "
                              "does not have yet; gate on --max-ppl-increase for now")
        unknown = [t for t in gate.min_task_acc if t not in mod.TASKS]
        if unknown:
            raise LowbitError(f"unknown task(s) {unknown}; known tasks: {', '.join(mod.TASKS)}")


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.gate-pending"


def failed_path(out: Path) -> Path:
    p = out.parent / f"{out.name}{FAILED_SUFFIX}"
    k = 2
    while p.exists():
        p = out.parent / f"{out.name}{FAILED_SUFFIX}-{k}"
        k += 1
    return p


def measure(path: Path, reference: nn.Module, tokenizer: Any, gate: Gate, progress: bool = True) -> dict[str, Any]:
    """The gate's figures for the artifact at ``path`` (loaded from disk) against ``reference``."""
    from lowbit.jobs.artifacts import load

    model, _ = load(path)
    report: dict[str, Any] = {"thresholds": {"max_ppl_increase": gate.max_ppl_increase,
                                             "min_task_acc": dict(gate.min_task_acc)}}
    if gate.max_ppl_increase is not None:
        from lowbit.jobs.evaluate import evaluate_models

        corpus, res = evaluate_models({"reference": reference, "artifact": model}, tokenizer, reference="reference",
                                      data=gate.data, protocol="gptq", ctx=gate.ctx, max_windows=gate.max_windows,
                                      progress=progress)
        ref, art = res["reference"], res["artifact"]
        report["perplexity"] = {"corpus": corpus, "protocol": "gptq", "ctx": gate.ctx, "windows": art.n_windows,
                                "tokens": art.n_tokens, "reference": ref.ppl, "artifact": art.ppl,
                                "increase_pct": 100 * (art.ppl / ref.ppl - 1), "kld": art.kld_mean}
    if gate.min_task_acc:
        mod = _tasks_module()
        res_t = mod.evaluate_tasks({"reference": reference, "artifact": model}, tokenizer, list(gate.min_task_acc),
                                   gate.task_limit, progress, reference="reference")
        report["tasks"] = {t: {"reference": res_t["reference"][t].metrics.get("acc"),
                               "artifact": res_t["artifact"][t].metrics.get("acc"),
                               "docs": res_t["artifact"][t].n_docs} for t in gate.min_task_acc}
    return report


def verdict(report: dict[str, Any], gate: Gate) -> list[str]:
    """The thresholds missed, each with by how much (empty: passed)."""
    misses = []
    ppl = report.get("perplexity")
    if gate.max_ppl_increase is not None and ppl is not None:
        inc = ppl["increase_pct"]
        if not inc <= gate.max_ppl_increase:  # NaN fails
            misses.append(f"perplexity {ppl['artifact']:.3f} is {inc:+.2f}% over the reference's "
                          f"{ppl['reference']:.3f} on {ppl['corpus']} ({ppl['windows']} windows of {ppl['ctx']}): "
                          f"limit {gate.max_ppl_increase}%, missed by {inc - gate.max_ppl_increase:.2f} points")
    for task, lim in gate.min_task_acc.items():
        acc = report.get("tasks", {}).get(task, {}).get("artifact")
        if acc is None or acc < lim:
            misses.append(f"{task} accuracy {acc if acc is None else f'{acc:.4f}'} below {lim:.4f}"
                          + ("" if acc is None else f" by {lim - acc:.4f}"))
    return misses


def gated(out: str | Path, gate: Gate, write: Callable[[Path], T], reference: Callable[[], tuple[nn.Module, Any]],
          *, force: bool = False, progress: bool = True) -> tuple[T, dict[str, Any] | None]:
    """Run ``write(path)`` (which writes an artifact folder at ``path``), gated by ``gate`` (see the module
    docstring). ``reference()`` gives the reference model and tokenizer (called only when there is a gate).
    Returns ``write``'s result and the gate's report (None without a gate); raises :class:`GateFailed`."""
    out = Path(out)
    if not gate.active:
        return write(out), None
    check_output_dir(out, force)
    check_gate(gate)
    stage = staging_path(out)
    if stage.exists():
        shutil.rmtree(stage)  # left by an interrupted gated run
    result = write(stage)
    try:
        ref, tok = reference()
        report = measure(stage, ref, tok, gate, progress)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    misses = verdict(report, gate)
    report["passed"] = not misses
    report["missed"] = misses
    write_json_atomic(stage / GATE_FILE, report)
    if misses:
        bad = failed_path(out)
        os.replace(stage, bad)
        fsync_dir(out.parent)
        raise GateFailed("the artifact failed its gate: " + "; ".join(misses) + f". It was kept aside at {bad}, "
                         f"not written to {out}", bad, report)
    if out.exists():  # --force on an existing artifact (checked above)
        shutil.rmtree(out)
    os.replace(stage, out)
    fsync_dir(out.parent)
    log.info("gate passed: %s", _summary(report))
    return result, report


def _summary(report: dict[str, Any]) -> str:
    parts = []
    if "perplexity" in report:
        p = report["perplexity"]
        parts.append(f"perplexity {p['artifact']:.3f} ({p['increase_pct']:+.2f}% over {p['reference']:.3f})")
    for t, r in report.get("tasks", {}).items():
        parts.append(f"{t} {r['artifact']:.4f} (reference {r['reference']:.4f})")
    return ", ".join(parts)
