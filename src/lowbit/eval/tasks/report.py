"""Tables and JSON of zero-shot results (what ``lowbit eval --tasks`` prints and writes).

JSON layout (``task_json``): ``{model: {task: TaskResult.to_dict()}}`` with, per task, ``metrics``
and ``stderr`` (lm-eval's names: ``acc``, ``acc_norm``, ``perplexity``), ``predictions`` (chosen
answer index per document, file order), ``predictions_norm``, ``gold``, ``loglikelihoods``, and
against a reference ``difference`` (metric minus the reference's) and ``agreement``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lowbit.eval.tasks.runner import TaskResult

COLUMNS = ["task", "model", "acc", "acc_norm", "perplexity", "Δ acc", "Δ acc_norm", "agree", "docs", "seconds"]


def _pm(res: TaskResult, metric: str, scale: float = 100.0, digits: int = 2) -> str:
    if metric not in res.metrics:
        return "-"
    err = res.stderr.get(metric)
    value = f"{res.metrics[metric] * scale:.{digits}f}"
    return value if err is None else f"{value} ± {err * scale:.{digits}f}"


def task_rows(results: Mapping[str, Mapping[str, TaskResult]]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows): one row per task and model, accuracies in percent with their standard errors; columns
    that are empty in every row (no reference, no perplexity task) are left out."""
    rows = []
    tasks = list(dict.fromkeys(t for per_model in results.values() for t in per_model))
    for task in tasks:
        for model, per_model in results.items():
            res = per_model.get(task)
            if res is None:
                continue
            diff = res.difference or {}
            rows.append([
                task, model, _pm(res, "acc"), _pm(res, "acc_norm"), _pm(res, "perplexity", 1.0, 3),
                f"{diff['acc'] * 100:+.2f}" if "acc" in diff else "-",
                f"{diff['acc_norm'] * 100:+.2f}" if "acc_norm" in diff else "-",
                "-" if res.agreement is None else f"{res.agreement * 100:.1f}%",
                str(res.n_docs), f"{res.seconds:.1f}",
            ])
    used = [j for j in range(len(COLUMNS)) if any(r[j] != "-" for r in rows)]  # drop empty columns
    return [COLUMNS[j] for j in used], [[r[j] for j in used] for r in rows]


def task_json(results: Mapping[str, Mapping[str, TaskResult]]) -> dict[str, Any]:
    """``{model: {task: plain-JSON result}}``."""
    return {model: {task: res.to_dict() for task, res in per_model.items()} for model, per_model in results.items()}
