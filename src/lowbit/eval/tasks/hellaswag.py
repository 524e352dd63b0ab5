"""HellaSwag as lm-eval's ``hellaswag`` task: four endings scored after the (cleaned) context.

lm-eval (``tasks/hellaswag/utils.py``): ``ctx = ctx_a + " " + ctx_b.capitalize()``, the context is
``preprocess(activity_label + ": " + ctx)`` and choice i is ``preprocess(endings[i])``, scored as
the continuation ``" " + choice``; metrics ``acc`` and ``acc_norm``. ``preprocess`` strips, turns
``" [title]"`` into ``". "``, deletes every ``[...]`` and replaces double spaces by one.

Files: llama.cpp's six-lines-per-item text (``label: context``, the gold index, four endings; the
file in ``../shared/data/hellaswag``) or JSON lines of the hub rows. A text item maps to the row
``activity_label = label, ctx_a = context, ctx_b = ""``: llama.cpp's file already joins ``ctx_a``
and ``ctx_b`` (without lm-eval's capitalisation of ``ctx_b``), so that part cannot be redone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lowbit.eval.tasks.base import Doc, TaskSpec, bad, field, gold_index, read_jsonl, read_lines, string_list

LAYOUT = ("six lines per item ('label: context', the gold index 0-3, four endings), or JSON lines "
          "{\"activity_label\", \"ctx_a\", \"ctx_b\", \"endings\": [4 strings], \"label\"}")


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleanup (WikiHow bracket artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _read_text(path: Path) -> list[tuple[dict[str, Any], str]]:
    lines = read_lines(path)
    if len(lines) % 6:
        first = len(lines) - len(lines) % 6 + 1
        raise bad(f"{path}:{first}", f"incomplete item: {len(lines) % 6} line(s) after the last complete item; "
                                     f"expected {LAYOUT}")
    rows = []
    for k in range(0, len(lines), 6):
        where = f"{path}:{k + 1}"
        label, sep, ctx = lines[k].partition(": ")
        if not sep or not ctx.strip():
            raise bad(where, f"field 'context' is {lines[k]!r:.60}, expected 'activity label: context'")
        gold = gold_index(lines[k + 1].strip(), 4, "gold", f"{path}:{k + 2}")
        endings = lines[k + 2 : k + 6]
        for j, ending in enumerate(endings):
            if not ending.strip():
                raise bad(f"{path}:{k + 3 + j}", f"field 'ending {j}' is empty; expected {LAYOUT}")
        rows.append(({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": endings, "label": str(gold)},
                     where))
    return rows


def read(path: Path) -> list[tuple[dict[str, Any], str]]:
    """Rows of a HellaSwag file: JSON lines when the first non-blank character is ``{``, else llama.cpp's text."""
    lines = read_lines(path)
    first = next(line for line in lines if line.strip())
    return read_jsonl(path, LAYOUT) if first.lstrip().startswith("{") else _read_text(path)


def make_doc(row: dict[str, Any], where: str) -> Doc:
    """lm-eval's ``process_docs`` + ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``."""
    label = field(row, "activity_label", str, where, LAYOUT)
    ctx = field(row, "ctx_a", str, where, LAYOUT) + " " + field(row, "ctx_b", str, where, LAYOUT).capitalize()
    endings = string_list(row, "endings", where, LAYOUT)
    query = preprocess(label + ": " + ctx)
    choices = tuple(preprocess(e) for e in endings)
    gold = gold_index(field(row, "label", (str, int), where, LAYOUT), len(choices), "label", where)
    return Doc(tuple((query, " " + c) for c in choices), choices, gold, row, where)


HELLASWAG = TaskSpec(
    name="hellaswag", output="multiple_choice", metrics=("acc", "acc_norm"),
    data_file="hellaswag/hellaswag_val_full.txt", hf=("Rowan/hellaswag", None, "validation"),
    lm_eval_yaml="hellaswag/hellaswag.yaml", layout=LAYOUT, read=read, make_doc=make_doc,
)
