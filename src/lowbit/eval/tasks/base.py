"""Zero-shot tasks as lm-evaluation-harness 0.4 runs them: task specs, documents, line-numbered file reading.

Every file layout a task accepts is first converted to the row of the Hugging Face dataset that
lm-eval reads (``Doc.row``: e.g. ARC's ``question`` / ``choices`` / ``answerKey``); lm-eval's own
prompt logic (its YAML templates and ``utils.py`` functions, restated per task module) then builds
the requests from that row. So a task file and the hub dataset go through the same code, and the
rows can be handed to lm-eval unchanged (:mod:`lowbit.eval.lm_eval_bridge`) for a side-by-side run.

A request is lm-eval's ``(context, continuation)`` pair: multiple-choice tasks score each choice as
a continuation of one context (WinoGrande: one continuation after each of two contexts); the
loglikelihood task (LAMBADA) has one request per document. Bad input raises
:class:`~lowbit.core.errors.DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lowbit.core.errors import DataError

Output = Literal["multiple_choice", "loglikelihood"]


@dataclass(frozen=True)
class Doc:
    """One document: lm-eval's requests, the choice strings and the gold index.

    ``requests[i] = (context, continuation)`` is request i; ``choices[i]`` is lm-eval's
    ``doc_to_choice`` entry i, whose character length normalises ``acc_norm``; ``gold`` indexes
    ``requests`` (0 for LAMBADA). ``row`` is the Hugging Face dataset row, ``where`` is ``file:line``.
    """

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int
    row: dict[str, Any]
    where: str


@dataclass(frozen=True)
class TaskSpec:
    """A task: how lm-eval scores it, where its data lives, how rows become documents.

    ``read(path)`` returns ``[(row, where)]`` in file order (rows in the HF layout); ``make_doc(row,
    where)`` applies lm-eval's prompt logic. ``data_file`` is the default file under the data folder
    (``../shared/data`` or ``LOWBIT_DATA``), ``hf`` the hub dataset ``(path, name, split)`` that lm-eval
    reads, ``lm_eval_yaml`` lm-eval's task file (relative to ``lm_eval/tasks``) for the bridge.
    """

    name: str
    output: Output
    metrics: tuple[str, ...]
    data_file: str | None
    hf: tuple[str, str | None, str]
    lm_eval_yaml: str
    layout: str  # one line describing the accepted file layouts, for error messages
    read: Callable[[Path], list[tuple[dict[str, Any], str]]]
    make_doc: Callable[[dict[str, Any], str], Doc]


@dataclass(frozen=True)
class TaskData:
    """A task's documents, in file order, and where they came from (a path or ``hf:dataset``)."""

    spec: TaskSpec
    source: str
    docs: tuple[Doc, ...]

    @property
    def name(self) -> str:
        return self.spec.name


def bad(where: str, msg: str) -> DataError:
    """``DataError("file:line: msg")``."""
    return DataError(f"{where}: {msg}")


def read_lines(path: Path) -> list[str]:
    """The file's lines (UTF-8, newline removed); DataError when it is missing, not UTF-8 or empty."""
    if not path.is_file():
        raise DataError(f"task file {path} does not exist; pass an existing file as --tasks NAME=PATH")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); task files are UTF-8 JSON lines or text") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: empty file, no documents; give a task file with at least one document")
    return lines


def read_jsonl(path: Path, layout: str) -> list[tuple[dict[str, Any], str]]:
    """``[(object, "file:line")]`` of a JSON-lines file (blank lines skipped); every line must be an object."""
    out = []
    for i, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad(where, f"not valid JSON ({exc.msg}); expected one object per line: {layout}") from exc
        if not isinstance(obj, dict):
            raise bad(where, f"a JSON {type(obj).__name__}, expected an object: {layout}")
        out.append((obj, where))
    return out


def field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, layout: str) -> Any:
    """``obj[key]``, checked to be present and of ``kind`` (bool is not an int here)."""
    if key not in obj:
        raise bad(where, f"field '{key}' missing; expected {layout}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise bad(where, f"field '{key}' is {type(value).__name__} {value!r:.60}, expected {names}; expected {layout}")
    return value


def string_list(obj: dict[str, Any], key: str, where: str, layout: str, min_len: int = 2) -> list[str]:
    """``obj[key]`` as a list of at least ``min_len`` strings."""
    value = field(obj, key, list, where, layout)
    if len(value) < min_len or not all(isinstance(v, str) for v in value):
        raise bad(where, f"field '{key}' must be a list of at least {min_len} strings, got {value!r:.80}")
    return value


def gold_index(value: Any, n: int, key: str, where: str) -> int:
    """A gold index in ``[0, n)`` from an int or a decimal string."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(where, f"field '{key}' is {value!r:.40}, expected an integer index of the right answer")
    if not 0 <= value < n:
        raise bad(where, f"field '{key}' = {value} is out of range for {n} choices (valid: 0..{n - 1})")
    return value
