"""``lowbit eval``: perplexity, KLD and top-1 of an artifact (or any model) against a reference, from disk."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.common import console, sub, table
from lowbit.core.errors import LowbitError

EXAMPLES = """\
  lowbit eval out/qwen-w4 --reference qwen2.5-coder-0.5b                  # WikiText-2, GPTQ protocol
  lowbit eval out/qwen-w4 --reference qwen2.5-coder-0.5b --max-windows 8 --json res.json
  lowbit eval qwen-q4km.gguf --reference qwen2.5-coder-0.5b --protocol llamacpp   # through llama.cpp
  lowbit eval out/qwen-w4 --data my_corpus.txt"""


def register(subs: Any) -> dict[str, Any]:
    e = sub(subs, "eval", "evaluate an artifact (or any model) against a reference, loaded from disk", EXAMPLES)
    e.add_argument("model", help="artifact folder written by lowbit, .gguf file, or any model spec")
    e.add_argument("--reference", default=None, help="reference model for KLD and top-1 (e.g. the source model)")
    e.add_argument("--data", default=None, help="evaluation text: wikitext2 | python-docs | PATH | hf:NAME[:CONFIG"
                                                "[:SPLIT]] (default wikitext2 when found)")
    e.add_argument("--protocol", default="gptq", choices=["gptq", "llamacpp"],
                   help="gptq: non-overlapping windows; llamacpp: 512-token windows scoring the second half")
    e.add_argument("--ctx", type=int, default=None, help="window in tokens (default 2048 gptq, 512 llamacpp)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.add_argument("--backend", default="auto", choices=["auto", "llamacpp", "transformers"],
                   help="how a .gguf runs: llama.cpp (adds tokens/s) or dequantized by transformers; auto: "
                        "llama.cpp when llama-cpp-python is installed")
    e.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: torch's thread count)")
    return {"eval": cmd_eval}


def check_eval_inputs(a: argparse.Namespace) -> None:
    """Every check that needs no model: paths, numbers, the corpus."""
    from lowbit.jobs.evaluate import eval_text
    from lowbit.models.loader import check_spec

    for spec in [a.model] + ([a.reference] if a.reference else []):
        check_spec(spec)
    for flag, v in (("--ctx", a.ctx), ("--max-windows", a.max_windows), ("--threads", a.threads)):
        if v is not None and v < 1:
            raise LowbitError(f"{flag} must be >= 1, got {v}")
    if a.ctx is not None and a.protocol == "llamacpp" and a.ctx % 2:
        raise LowbitError(f"--ctx {a.ctx}: the llamacpp protocol scores the second half of each window; use an "
                          "even window")
    if a.json:
        from lowbit.core.io import check_output_file

        check_output_file(a.json)
    eval_text(a.data)


def cmd_eval(a: argparse.Namespace) -> None:
    from lowbit.core.io import write_json_atomic
    from lowbit.eval.llamacpp import LlamaCppLogits, resolve_backend
    from lowbit.jobs.artifacts import load_any
    from lowbit.jobs.evaluate import evaluate_models

    check_eval_inputs(a)
    models: dict[str, Any] = {}
    tok = None
    ctx = a.ctx or (2048 if a.protocol == "gptq" else 512)
    if a.reference:
        models["reference"], tok = load_any(a.reference)
    name = Path(a.model).name or a.model
    # a GGUF run by llama.cpp is scored on the ids of the reference's tokenizer when there is one
    models[name], tok_m = load_any(a.model, resolve_backend(a.model, a.backend), ctx=ctx, threads=a.threads,
                                   tokenizer=tok is None)
    tok = tok or tok_m
    if isinstance(models[name], LlamaCppLogits):
        models[name].check_tokenizer(tok)
    corpus, res = evaluate_models(models, tok, reference="reference" if a.reference else None, data=a.data,
                                  protocol=a.protocol, ctx=ctx, max_windows=a.max_windows,
                                  progress=not a.no_progress)
    speeds = {n: m.speed() for n, m in models.items() if isinstance(m, LlamaCppLogits)}
    first = next(iter(res.values()))
    rows = []
    for n, r in res.items():
        rows.append([n, f"{r.ppl:.4f}", "-" if r.kld_mean is None else f"{r.kld_mean:.5f}",
                     "-" if r.top1 is None else f"{r.top1:.4f}", str(r.n_tokens), f"{r.seconds:.1f}"])
        if speeds:  # llama.cpp rows get tokens/s
            rows[-1] += [f"{speeds[n].prefill_tps:.1f}", f"{speeds[n].decode_tps:.1f}"] if n in speeds else ["-", "-"]
    columns = ["model", "ppl", "KLD", "top-1", "tokens", "seconds"]
    columns += ["prefill tok/s", "decode tok/s"] if speeds else []
    console.print(table(f"{a.protocol} protocol, {corpus}, {first.n_windows} windows of {ctx} tokens", columns, rows))
    if a.json:
        write_json_atomic(a.json, {"corpus": corpus, "results": {
            n: {**r.to_dict(), **({"backend": "llama.cpp", "speed": speeds[n].to_dict()} if n in speeds else {})}
            for n, r in res.items()}})
