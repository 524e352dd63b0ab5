"""The task registry and task loading: ``--tasks arc_easy,hellaswag=PATH`` -> documents.

Where a task's documents come from (first hit wins): the path given as ``NAME=PATH``; the task's
file under ``LOWBIT_DATA`` or ``../shared/data`` (e.g. ``arc/arc_easy.jsonl``); the hub dataset
lm-eval reads, through ``datasets`` when it is installed and online. ``limit`` keeps the first N
documents in file order, as lm-eval's ``--limit`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.core.errors import DataError
from lowbit.data import find_data_file
from lowbit.eval.tasks.arc import ARC_CHALLENGE, ARC_EASY
from lowbit.eval.tasks.base import TaskData, TaskSpec
from lowbit.eval.tasks.hellaswag import HELLASWAG
from lowbit.eval.tasks.lambada import LAMBADA_OPENAI
from lowbit.eval.tasks.piqa import PIQA
from lowbit.eval.tasks.winogrande import WINOGRANDE

log = logging.getLogger(__name__)

TASKS: dict[str, TaskSpec] = {
    s.name: s for s in (HELLASWAG, ARC_EASY, ARC_CHALLENGE, PIQA, WINOGRANDE, LAMBADA_OPENAI)
}


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name``; DataError listing the known tasks otherwise."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (NAME or NAME=PATH)")
    return TASKS[name]


def parse_tasks(text: str) -> list[tuple[str, Path | None]]:
    """``"arc_easy,hellaswag=PATH"`` -> ``[("arc_easy", None), ("hellaswag", Path(PATH))]``, names checked."""
    out: list[tuple[str, Path | None]] = []
    for item in text.split(","):
        name, sep, path = item.strip().partition("=")
        if not name:
            raise DataError(f"--tasks {text!r} has an empty task name; write NAME[=PATH],NAME[=PATH]...")
        get_task(name)
        if sep and not path:
            raise DataError(f"--tasks {name}= has no path; write {name}=PATH or just {name}")
        if any(n == name for n, _ in out):
            raise DataError(f"task {name!r} is listed twice in --tasks {text!r}")
        out.append((name, Path(path) if sep else None))
    return out


def _hub_rows(spec: TaskSpec) -> list[tuple[dict[str, Any], str]]:
    """The task's hub dataset rows through ``datasets`` (needs the package and the network)."""
    path, name, split = spec.hf
    fix = (f"pass a file as --tasks {spec.name}=PATH ({spec.layout}), or put it at "
           f"{spec.data_file} under LOWBIT_DATA or ../shared/data")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DataError(f"no data for task {spec.name}: no file found and `datasets` is not installed; {fix}") from exc
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # any hub or network failure means "not available"
        raise DataError(f"no data for task {spec.name}: no file found and `datasets` could not load "
                        f"{path} ({type(exc).__name__}: {str(exc)[:200]}); {fix}") from exc
    return [(dict(row), f"hf:{path}[{split}][{i}]") for i, row in enumerate(ds)]


def load_task(name: str, path: str | Path | None = None, limit: int | None = None) -> TaskData:
    """Task ``name``'s first ``limit`` documents from ``path``, the data folder or the hub (in that order)."""
    spec = get_task(name)
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit} must be at least 1")
    if path is None and spec.data_file is not None:
        path = find_data_file(spec.data_file)
    if path is not None:
        source = str(path)
        rows = spec.read(Path(path))
    else:
        source = "hf:" + "/".join(p for p in spec.hf if p)
        rows = _hub_rows(spec)
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise DataError(f"{source}: no documents for task {name}; expected {spec.layout}")
    docs = tuple(spec.make_doc(row, where) for row, where in rows)
    log.info("%s: %d documents from %s", name, len(docs), source)
    return TaskData(spec, source, docs)


def load_tasks(tasks: Sequence[str | tuple[str, str | Path | None] | TaskData], limit: int | None = None
               ) -> list[TaskData]:
    """Load tasks given as names, ``"NAME=PATH"`` strings, ``(name, path)`` pairs or loaded TaskData."""
    out: list[TaskData] = []
    for t in tasks:
        if isinstance(t, TaskData):
            out.append(TaskData(t.spec, t.source, t.docs[:limit]) if limit is not None else t)
        elif isinstance(t, str):
            out.extend(load_task(n, p, limit) for n, p in parse_tasks(t))
        else:
            out.append(load_task(t[0], t[1], limit))
    return out
