"""Zero-shot task evaluation of several models on the same documents, with an optional reference.

``evaluate_tasks(models, tokenizer, tasks)`` tokenizes each task once (lm-eval's tokenization,
:mod:`.encode`), groups consecutive documents into packs of at most ``max_tokens`` trie nodes
(:mod:`.packing`), scores every pack with each model's scorer (:mod:`.scorer`) and aggregates
lm-eval's metrics (:mod:`.metrics`). Per document it keeps the chosen answer (``predictions``, file
order), so two runs can be compared document by document; against a reference each model also
gets the per-metric difference and the fraction of documents where both choose the same answer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lowbit.core.errors import LowbitError
from lowbit.eval.llamacpp import LlamaCppLogits
from lowbit.eval.tasks.base import TaskData
from lowbit.eval.tasks.encode import Encoder, TokenRequest, max_length_of
from lowbit.eval.tasks.metrics import BOOTSTRAP_ITERS, aggregate, choose
from lowbit.eval.tasks.packing import plan_packs
from lowbit.eval.tasks.registry import load_tasks
from lowbit.eval.tasks.scorer import make_scorer

log = logging.getLogger(__name__)

MAX_TOKENS = 512  # trie nodes per forward: large enough for efficient GEMMs, small enough for the N^2 mask
KEEP_BUDGET = 1 << 25  # scored positions x vocabulary per forward (128 MiB of float32 logits)


@dataclass
class TaskResult:
    """One model on one task: lm-eval's metrics, their standard errors and per-document answers.

    ``predictions[d]``: the chosen answer of document d (argmax log-likelihood; LAMBADA: 1 when greedy
    decoding gives the last word, else 0); ``predictions_norm``: the ``acc_norm`` choice (None where the
    task has no acc_norm). ``loglikelihoods[d][i]``: of request i. ``tokens``: tokens run through the model
    (after prefix sharing), ``tokens_unshared``: what one forward per request would run.
    """

    task: str
    source: str
    n_docs: int
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    predictions: list[int]
    predictions_norm: list[int] | None
    gold: list[int]
    loglikelihoods: list[list[float]]
    seconds: float
    tokens: int
    tokens_unshared: int
    scorer: str
    reference: str | None = None
    difference: dict[str, float] | None = None  # metric - reference metric
    agreement: float | None = None  # fraction of documents with the reference's prediction

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return dataclasses.asdict(self)


def _score_task(model: Any, task: TaskData, encoded: list[list[TokenRequest]], packs: list[list[int]],
                on_docs: Any) -> tuple[list[list[tuple[float, bool]]], float, int, str]:
    scorer = make_scorer(model)
    out: list[list[tuple[float, bool]]] = [[] for _ in encoded]
    t0 = time.perf_counter()
    for group in packs:
        flat = [req for d in group for req in encoded[d]]
        scores = scorer.score(flat)
        i = 0
        for d in group:
            out[d] = scores[i : i + len(encoded[d])]
            i += len(encoded[d])
        on_docs(len(group))
    seconds = time.perf_counter() - t0
    return out, seconds, scorer.tokens, scorer.name


def _result(task: TaskData, scores: list[list[tuple[float, bool]]], seconds: float, tokens: int, unshared: int,
            scorer: str, bootstrap_iters: int) -> TaskResult:
    spec = task.spec
    per_doc: dict[str, list[float]] = {m: [] for m in spec.metrics}
    preds, preds_norm = [], []
    for doc, sc in zip(task.docs, scores, strict=True):
        lls = [s[0] for s in sc]
        if spec.output == "loglikelihood":
            greedy = sc[0][1]
            preds.append(int(greedy))
            per_doc["acc"].append(float(greedy))
            per_doc["perplexity"].append(lls[0])
            continue
        pred, pred_norm = choose(lls, doc.choices)
        preds.append(pred)
        preds_norm.append(pred_norm)
        per_doc["acc"].append(1.0 if pred == doc.gold else 0.0)
        if "acc_norm" in per_doc:
            per_doc["acc_norm"].append(1.0 if pred_norm == doc.gold else 0.0)
    metrics, stderr = aggregate(spec.metrics, per_doc, bootstrap_iters)
    return TaskResult(
        task=spec.name, source=task.source, n_docs=len(task.docs), metrics=metrics, stderr=stderr,
        predictions=preds, predictions_norm=preds_norm if "acc_norm" in spec.metrics else None,
        gold=[d.gold for d in task.docs], loglikelihoods=[[s[0] for s in sc] for sc in scores],
        seconds=seconds, tokens=tokens, tokens_unshared=unshared, scorer=scorer,
    )


def _compare(res: TaskResult, ref: TaskResult, reference: str) -> None:
    res.reference = reference
    res.difference = {m: res.metrics[m] - ref.metrics[m] for m in res.metrics}
    same = sum(a == b for a, b in zip(res.predictions, ref.predictions, strict=True))
    res.agreement = same / max(1, res.n_docs)


def _max_length(model: Any, tokenizer: Any) -> int:
    """The longest model input: llama.cpp's context, else lm-eval's ``resolve_max_length``."""
    if isinstance(model, LlamaCppLogits):
        return model.ctx
    return max_length_of(getattr(model, "config", None), tokenizer)


def _vocab_size(model: Any) -> int:
    """Rows of the model's logits (262144, the largest in use, when the model does not say)."""
    if isinstance(model, LlamaCppLogits):
        return model.n_vocab
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else 262_144


def evaluate_tasks(
    models: Mapping[str, Any],
    tokenizer: Any,
    tasks: Sequence[str | tuple[str, Any] | TaskData],
    limit: int | None = None,
    progress: bool = True,
    *,
    reference: str | None = None,
    max_tokens: int = MAX_TOKENS,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
) -> dict[str, dict[str, TaskResult]]:
    """Score every model on every task; returns ``{model: {task: TaskResult}}`` in the given orders.

    ``models``: name -> Hugging Face causal LM (``model(ids).logits``), any ``ids (1, T) -> logits (1, T,
    V)`` callable, or :class:`~lowbit.eval.llamacpp.LlamaCppLogits`; all share ``tokenizer``. ``tasks``:
    names, ``"NAME=PATH"`` strings, ``(name, path)`` pairs or loaded :class:`TaskData`; ``limit`` keeps
    the first N documents of each. With ``reference`` (one of ``models``) every other model's results
    carry the difference to it and the per-document agreement.
    """
    if not models:
        raise LowbitError("no model to evaluate; pass at least one {name: model}")
    if reference is not None and reference not in models:
        raise LowbitError(f"reference {reference!r} is not among the models {list(models)}; name one of them")
    loaded = load_tasks(tasks, limit)
    encoder = Encoder(tokenizer, min(_max_length(m, tokenizer) for m in models.values()))
    vocab = max(_vocab_size(m) for m in models.values())
    results: dict[str, dict[str, TaskResult]] = {name: {} for name in models}

    import torch
    from rich.progress import Progress

    total = sum(len(t.docs) for t in loaded) * len(models)
    with torch.inference_mode(), Progress(disable=not progress, transient=True) as bar:
        bar_task = bar.add_task("zero-shot", total=total)
        for task in loaded:
            encoded = [[encoder.encode(c, x, doc.where) for c, x in doc.requests] for doc in task.docs]
            packs = plan_packs(encoded, max_tokens, max(64, KEEP_BUDGET // vocab))
            unshared = sum(len(r.input_ids) for reqs in encoded for r in reqs)
            for name, model in models.items():
                bar.update(bar_task, description=f"{task.name} {name}")
                scores, seconds, tokens, scorer = _score_task(model, task, encoded, packs,
                                                              lambda n: bar.advance(bar_task, n))
                res = _result(task, scores, seconds, tokens, unshared, scorer, bootstrap_iters)
                results[name][task.name] = res
                log.info("%s %s: %s (%d docs, %.1f s, %d tokens run of %d)", name, task.name,
                         ", ".join(f"{k} {v:.4f}" for k, v in res.metrics.items()), res.n_docs, seconds,
                         tokens, unshared)
    if reference is not None:
        for name in models:
            if name != reference:
                for tname, res in results[name].items():
                    _compare(res, results[reference][tname], reference)
    return results
