"""The evaluation job: perplexity, KL divergence and top-1 agreement of models sharing one tokenizer,
by a pinned protocol, on one corpus (every artifact loaded from disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lowbit.core.errors import DataError, LowbitError
from lowbit.data import default_eval_corpus, resolve_eval_text
from lowbit.eval import EvalResult, adds_bos, evaluate, tokenize_corpus

PROTOCOLS = ("gptq", "llamacpp")


#: characters read per token evaluated, when only the first windows are: ~4x what English text needs
CHARS_PER_TOKEN = 16


def eval_text(data: str | None, max_chars: int | None = None) -> tuple[str, str]:
    """(label, text) of an evaluation corpus (default: WikiText-2 test when found), at most ``max_chars``
    characters of a user's file or dataset; a blank one is refused here, before any model loads."""
    label, text = resolve_eval_text(data or default_eval_corpus(), max_chars)
    if not text.strip():
        raise DataError(f"evaluation corpus {label} is empty or blank; give a corpus with text (e.g. wikitext2)")
    return label, text


def evaluate_models(models: dict[str, nn.Module], tokenizer: Any, *, reference: str | None, data: str | None,
                    protocol: str = "gptq", ctx: int = 2048, max_windows: int | None = None,
                    progress: bool = True) -> tuple[str, dict[str, EvalResult]]:
    """Evaluate models sharing ``tokenizer`` on one corpus; returns (corpus label, results)."""
    if protocol not in PROTOCOLS:
        raise LowbitError(f"unknown protocol {protocol!r}; use 'gptq' or 'llamacpp'")
    label, text = eval_text(data, None if max_windows is None else (max_windows + 1) * ctx * CHARS_PER_TOKEN)
    if protocol == "llamacpp" and label == "wikitext2":
        from lowbit.data import wikitext2_test

        text = wikitext2_test(raw=True)  # llama-perplexity reads the raw file
    ids = tokenize_corpus(tokenizer, text)
    bos = adds_bos(tokenizer) if protocol == "llamacpp" else None
    res = evaluate(models, ids, protocol, ctx, max_windows, reference=reference,  # type: ignore[arg-type]
                   progress=progress, bos_token_id=bos)
    return label, res


def evaluate_artifact(path: str | Path, reference: str | Path | None = None, *, data: str | None = None,
                      protocol: str = "gptq", ctx: int | None = None, max_windows: int | None = None,
                      progress: bool = True) -> dict[str, EvalResult]:
    """``lowbit.evaluate``: perplexity of an artifact (or any model), with KLD and top-1 against ``reference``."""
    from lowbit.jobs.artifacts import load

    models: dict[str, Any] = {}
    tok = None
    if reference is not None:
        models["reference"], tok = load(reference)
    name = Path(str(path)).name or str(path)
    models[name], tok_m = load(path)
    _, res = evaluate_models(models, tok or tok_m, reference="reference" if reference is not None else None,
                             data=data, protocol=protocol, ctx=ctx or (2048 if protocol == "gptq" else 512),
                             max_windows=max_windows, progress=progress)
    return res
