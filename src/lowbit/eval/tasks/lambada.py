"""LAMBADA (OpenAI's version) as lm-eval's ``lambada_openai``: the last word after the passage.

lm-eval: context ``" ".join(text.split(" ")[:-1])``, continuation ``" " + text.split(" ")[-1]``
(the target is everything after the last space, punctuation included); ``acc`` is 1 when greedy
decoding reproduces every token of the continuation, and ``perplexity = exp(-mean_d ll_d)`` over
the documents' continuation log-likelihoods ``ll_d`` (per document, not per token).

Files: JSON lines ``{"text": ...}`` (the layout of OpenAI's ``lambada_test.jsonl`` and of the hub
dataset ``EleutherAI/lambada_openai``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.eval.tasks.base import Doc, TaskSpec, bad, field, read_jsonl

LAYOUT = 'JSON lines {"text": "passage ... last_word"}'


def read(path: Path) -> list[tuple[dict[str, Any], str]]:
    """Rows ``{"text"}`` of a LAMBADA file."""
    return read_jsonl(path, LAYOUT)


def make_doc(row: dict[str, Any], where: str) -> Doc:
    """lm-eval's ``doc_to_text`` / ``doc_to_target`` for ``lambada_openai``."""
    text = field(row, "text", str, where, LAYOUT)
    words = text.split(" ")
    if not words[-1]:
        raise bad(where, f"field 'text' ends with a space: no last word to predict ({text[-40:]!r})")
    context, target = " ".join(words[:-1]), " " + words[-1]
    return Doc(((context, target),), (target,), 0, row, where)


LAMBADA_OPENAI = TaskSpec(
    name="lambada_openai", output="loglikelihood", metrics=("perplexity", "acc"),
    data_file="lambada/lambada_test.jsonl", hf=("EleutherAI/lambada_openai", "default", "test"),
    lm_eval_yaml="lambada/lambada_openai.yaml", layout=LAYOUT, read=read, make_doc=make_doc,
)
