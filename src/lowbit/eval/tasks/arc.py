"""ARC-Easy and ARC-Challenge as lm-eval's ``arc_easy`` / ``arc_challenge``.

lm-eval: context ``"Question: {question}\\nAnswer:"``, choice i is ``choices.text[i]`` scored as
``" " + choice``, gold ``choices.label.index(answerKey)``; metrics ``acc`` and ``acc_norm``.

Files: ``{"query": "Question: ...", "choices": [...], "gold": i}`` per line (``../shared/data/arc``;
the ``"Question: "`` prefix is optional) or the hub rows ``{"question", "choices": {"text", "label"},
"answerKey"}``. An ARC-Challenge file has the same layout as an ARC-Easy one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.eval.tasks.base import Doc, TaskSpec, bad, field, gold_index, read_jsonl, string_list

LAYOUT = ('JSON lines {"query": "Question: ...", "choices": [strings], "gold": index} or '
          '{"question", "choices": {"text": [...], "label": [...]}, "answerKey"}')
_LABELS = "ABCDEFGHIJ"


def _from_query(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The hub row for a ``query``/``choices``/``gold`` line."""
    question = field(obj, "query", str, where, LAYOUT).removeprefix("Question: ").removesuffix("\nAnswer:")
    texts = string_list(obj, "choices", where, LAYOUT)
    if len(texts) > len(_LABELS):
        raise bad(where, f"field 'choices' has {len(texts)} entries, at most {len(_LABELS)} are supported")
    gold = gold_index(field(obj, "gold", (int, str), where, LAYOUT), len(texts), "gold", where)
    labels = list(_LABELS[: len(texts)])
    return {"question": question, "choices": {"text": texts, "label": labels}, "answerKey": labels[gold]}


def read(path: Path) -> list[tuple[dict[str, Any], str]]:
    """Rows of an ARC file, each in the hub layout."""
    rows = []
    for obj, where in read_jsonl(path, LAYOUT):
        rows.append((obj if "question" in obj else _from_query(obj, where), where))
    return rows


def make_doc(row: dict[str, Any], where: str) -> Doc:
    """lm-eval's ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` for ARC."""
    question = field(row, "question", str, where, LAYOUT)
    choices = field(row, "choices", dict, where, LAYOUT)
    texts = string_list(choices, "text", where, LAYOUT)
    labels = string_list(choices, "label", where, LAYOUT)
    if len(labels) != len(texts):
        raise bad(where, f"field 'choices' has {len(texts)} texts but {len(labels)} labels")
    key = field(row, "answerKey", str, where, LAYOUT)
    if key not in labels:
        raise bad(where, f"field 'answerKey' = {key!r} is not one of the labels {labels}")
    context = f"Question: {question}\nAnswer:"
    return Doc(tuple((context, " " + t) for t in texts), tuple(texts), labels.index(key), row, where)


def _spec(name: str, hub_name: str) -> TaskSpec:
    return TaskSpec(
        name=name, output="multiple_choice", metrics=("acc", "acc_norm"), data_file=f"arc/{name}.jsonl",
        hf=("allenai/ai2_arc", hub_name, "test"), lm_eval_yaml=f"arc/{name}.yaml", layout=LAYOUT, read=read,
        make_doc=make_doc,
    )


ARC_EASY = _spec("arc_easy", "ARC-Easy")
ARC_CHALLENGE = _spec("arc_challenge", "ARC-Challenge")
