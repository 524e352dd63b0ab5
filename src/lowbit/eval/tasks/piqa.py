"""PIQA as lm-eval's ``piqa``: two solutions scored after ``"Question: {goal}\\nAnswer:"``.

lm-eval: choices ``[sol1, sol2]`` scored as ``" " + choice``, gold ``label``; metrics ``acc`` and
``acc_norm``. Files: JSON lines ``{"goal", "sol1", "sol2"}`` with the labels either in a ``"label"``
field or, as distributed (``../shared/data/piqa``), one per line in ``<stem>-labels.lst`` beside
the file (``valid.jsonl`` -> ``valid-labels.lst``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.eval.tasks.base import Doc, TaskSpec, bad, field, gold_index, read_jsonl, read_lines

LAYOUT = ('JSON lines {"goal", "sol1", "sol2", "label": 0|1}, or without "label" and a '
          '<stem>-labels.lst file of 0/1 lines beside it')


def labels_file(path: Path) -> Path:
    """Where the labels of a PIQA file lie: ``valid.jsonl`` -> ``valid-labels.lst``."""
    return path.with_name(f"{path.stem}-labels.lst")


def read(path: Path) -> list[tuple[dict[str, Any], str]]:
    """Rows ``{"goal", "sol1", "sol2", "label"}``, labels merged in from the labels file when needed."""
    rows = read_jsonl(path, LAYOUT)
    if all("label" in obj for obj, _ in rows):
        return rows
    lf = labels_file(path)
    if not lf.is_file():
        where = next(w for obj, w in rows if "label" not in obj)
        raise bad(where, f"field 'label' missing and no labels file {lf.name} beside it; expected {LAYOUT}")
    labels = read_lines(lf)
    if len(labels) < len(rows):
        raise bad(f"{lf}:{len(labels) + 1}", f"missing label: {len(labels)} labels for the {len(rows)} "
                                            f"documents of {path.name} (one 0/1 per line)")
    if any(line.strip() for line in labels[len(rows):]):
        raise bad(f"{lf}:{len(rows) + 1}", f"more labels than the {len(rows)} documents of {path.name}")
    out = []
    for i, ((obj, where), label) in enumerate(zip(rows, labels, strict=False)):
        gold = gold_index(label.strip(), 2, "label", f"{lf}:{i + 1}")
        out.append(({**obj, "label": obj.get("label", gold)}, where))
    return out


def make_doc(row: dict[str, Any], where: str) -> Doc:
    """lm-eval's ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` for PIQA."""
    goal = field(row, "goal", str, where, LAYOUT)
    choices = (field(row, "sol1", str, where, LAYOUT), field(row, "sol2", str, where, LAYOUT))
    gold = gold_index(field(row, "label", (int, str), where, LAYOUT), 2, "label", where)
    context = f"Question: {goal}\nAnswer:"
    return Doc(tuple((context, " " + c) for c in choices), choices, gold, row, where)


PIQA = TaskSpec(
    name="piqa", output="multiple_choice", metrics=("acc", "acc_norm"), data_file="piqa/valid.jsonl",
    hf=("baber/piqa", None, "validation"), lm_eval_yaml="piqa/piqa.yaml", layout=LAYOUT, read=read,
    make_doc=make_doc,
)
