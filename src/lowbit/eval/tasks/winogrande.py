"""WinoGrande as lm-eval's ``winogrande``: partial scoring, one continuation after two contexts.

lm-eval (``preprocess_winogrande.py``): with ``i = sentence.index("_")``, the two contexts are
``sentence[:i] + option1`` and ``sentence[:i] + option2``, the continuation ``" " +
sentence[i+1:].strip()`` is scored after each, gold ``{"1": 0, "2": 1}[answer]``; metric ``acc``.

Files: ``{"context_options": [2 prefixes], "continuation", "gold"}`` per line
(``../shared/data/winogrande``) or the hub rows ``{"sentence", "option1", "option2", "answer"}``.
A prefix pair maps to the row whose blank sits after their common part, cut back to a word start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lowbit.eval.tasks.base import Doc, TaskSpec, bad, field, gold_index, read_jsonl, string_list

LAYOUT = ('JSON lines {"context_options": [2 strings], "continuation", "gold": 0|1} or '
          '{"sentence" (with one "_"), "option1", "option2", "answer": "1"|"2"}')


def _from_options(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The hub row whose two contexts are ``context_options`` and whose target is ``continuation``."""
    a, b = string_list(obj, "context_options", where, LAYOUT)[:2]
    if len(obj["context_options"]) != 2:
        raise bad(where, f"field 'context_options' has {len(obj['context_options'])} entries, expected 2")
    cont = field(obj, "continuation", str, where, LAYOUT)
    gold = gold_index(field(obj, "gold", (int, str), where, LAYOUT), 2, "gold", where)
    common = os.path.commonprefix([a, b])
    cut = common.rfind(" ") + 1 if " " in common else 0
    cut = cut if cut < len(a) and cut < len(b) else len(common)
    return {"sentence": a[:cut] + "_ " + cont, "option1": a[cut:], "option2": b[cut:], "answer": str(gold + 1)}


def read(path: Path) -> list[tuple[dict[str, Any], str]]:
    """Rows of a WinoGrande file, each in the hub layout."""
    return [(obj if "sentence" in obj else _from_options(obj, where), where) for obj, where in read_jsonl(path, LAYOUT)]


def make_doc(row: dict[str, Any], where: str) -> Doc:
    """lm-eval's ``doc_to_text`` (the gold index), ``doc_to_choice`` (contexts), ``doc_to_target``."""
    sentence = field(row, "sentence", str, where, LAYOUT)
    if "_" not in sentence:
        raise bad(where, f"field 'sentence' has no '_' blank: {sentence!r:.60}")
    i = sentence.index("_")
    options = (field(row, "option1", str, where, LAYOUT), field(row, "option2", str, where, LAYOUT))
    answer = field(row, "answer", (str, int), where, LAYOUT)
    if str(answer).strip() not in ("1", "2"):
        raise bad(where, f"field 'answer' = {answer!r} is out of range: expected '1' or '2'")
    contexts = tuple(sentence[:i] + opt for opt in options)
    target = " " + sentence[i + 1 :].strip()
    return Doc(tuple((c, target) for c in contexts), contexts, int(str(answer).strip()) - 1, row, where)


WINOGRANDE = TaskSpec(
    name="winogrande", output="multiple_choice", metrics=("acc",), data_file="winogrande/winogrande.jsonl",
    hf=("allenai/winogrande", "winogrande_xl", "validation"), lm_eval_yaml="winogrande/default.yaml",
    layout=LAYOUT, read=read, make_doc=make_doc,
)
