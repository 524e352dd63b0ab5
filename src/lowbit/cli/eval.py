"""``lowbit eval``: perplexity, KLD and top-1 of an artifact (or any model) against a reference, from disk; zero-shot
tasks scored as lm-eval scores them (``--tasks``), and lm-eval itself on the loaded model (``--lm-eval``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.common import console, say, sub, table
from lowbit.core.errors import LowbitError

EXAMPLES = """\
  lowbit eval out/qwen-w4 --reference qwen2.5-coder-0.5b                  # WikiText-2, GPTQ protocol
  lowbit eval out/qwen-w4 --reference qwen2.5-coder-0.5b --max-windows 8 --json res.json
  lowbit eval qwen-q4km.gguf --reference qwen2.5-coder-0.5b --protocol llamacpp   # through llama.cpp
  lowbit eval out/qwen-w4 --data my_corpus.txt
  lowbit eval out/qwen-w4 --reference qwen2.5-coder-0.5b --tasks hellaswag,arc_easy,piqa,winogrande --limit 500
  lowbit eval out/qwen-w4 --data wikitext2 --tasks arc_easy,lambada_openai=lambada_test.jsonl  # both in one run
  lowbit eval out/qwen-w4 --lm-eval arc_easy,mmlu                        # lm-eval's own tasks and table

Perplexity runs unless only --tasks/--lm-eval are given; with them it runs when a perplexity option
(--data, --protocol, --ctx, --max-windows) is given too."""


def register(subs: Any) -> dict[str, Any]:
    e = sub(subs, "eval", "evaluate an artifact (or any model) against a reference, loaded from disk", EXAMPLES)
    e.add_argument("model", help="artifact folder written by lowbit, .gguf file, or any model spec")
    e.add_argument("--reference", default=None, help="reference model for KLD, top-1 and the task accuracy differences "
                                                     "(e.g. the source model)")
    e.add_argument("--data", default=None, help="evaluation text: wikitext2 | python-docs | PATH | hf:NAME[:CONFIG"
                                                "[:SPLIT]] (default wikitext2 when found)")
    e.add_argument("--protocol", default=None, choices=["gptq", "llamacpp"],
                   help="gptq (default): non-overlapping windows; llamacpp: 512-token windows scoring the second half")
    e.add_argument("--ctx", type=int, default=None, help="window in tokens (default 2048 gptq, 512 llamacpp)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.add_argument("--backend", default="auto", choices=["auto", "llamacpp", "transformers"],
                   help="how a .gguf runs: llama.cpp (adds tokens/s) or dequantized by transformers; auto: "
                        "llama.cpp when llama-cpp-python is installed")
    e.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: torch's thread count)")
    from lowbit.eval.tasks import TASKS

    e.add_argument("--tasks", default=None, metavar="NAME[=PATH],...",
                   help=f"zero-shot tasks scored as lm-eval 0.4 scores them: {', '.join(TASKS)}; documents from PATH, "
                        "else LOWBIT_DATA or ../shared/data, else the hub")
    e.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    e.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="run these lm-eval tasks on the loaded model through lm-eval's HFLM, with lm-eval's own "
                        "table (pip install 'lowbit[eval]')")
    e.add_argument("--lm-eval-include", default=None, metavar="DIR", help="more lm-eval task YAMLs (local, offline)")
    return {"eval": cmd_eval}


def wants_perplexity(a: argparse.Namespace) -> bool:
    """Perplexity unless only tasks are asked for; with tasks, when a perplexity option is given too."""
    return not (a.tasks or a.lm_eval) or any(v is not None for v in (a.data, a.protocol, a.ctx, a.max_windows))


def check_eval_inputs(a: argparse.Namespace) -> None:
    """Every check that needs no model: paths, numbers, the corpus."""
    from lowbit.jobs.evaluate import eval_text
    from lowbit.models.loader import check_spec

    for spec in [a.model] + ([a.reference] if a.reference else []):
        check_spec(spec)
    for flag, v in (("--ctx", a.ctx), ("--max-windows", a.max_windows), ("--threads", a.threads),
                    ("--limit", a.limit)):
        if v is not None and v < 1:
            raise LowbitError(f"{flag} must be >= 1, got {v}")
    if a.ctx is not None and a.protocol == "llamacpp" and a.ctx % 2:
        raise LowbitError(f"--ctx {a.ctx}: the llamacpp protocol scores the second half of each window; use an "
                          "even window")
    if a.limit is not None and not (a.tasks or a.lm_eval):
        raise LowbitError("--limit goes with --tasks or --lm-eval (the first N documents of each task)")
    if a.lm_eval_include and not a.lm_eval:
        raise LowbitError("--lm-eval-include goes with --lm-eval (the task YAMLs it may name)")
    if a.json:
        from lowbit.core.io import check_output_file

        check_output_file(a.json)
    if wants_perplexity(a):
        eval_text(a.data)


def cmd_eval(a: argparse.Namespace) -> None:
    from lowbit.core.io import write_json_atomic
    from lowbit.eval.llamacpp import LlamaCppLogits, resolve_backend
    from lowbit.eval.tasks import load_tasks
    from lowbit.jobs.artifacts import load_any

    check_eval_inputs(a)
    ppl = wants_perplexity(a)
    a.protocol = a.protocol or "gptq"
    tasks = load_tasks([a.tasks], a.limit) if a.tasks else []  # task files checked before any model loads
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
    out: dict[str, Any] = {}
    if tasks or a.lm_eval:
        out.update(_eval_tasks(a, models, tok, tasks))
    if ppl:
        out.update(_eval_perplexity(a, models, tok, ctx))
    if a.json:
        write_json_atomic(a.json, out)


def _eval_tasks(a: argparse.Namespace, models: dict[str, Any], tok: Any, tasks: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if tasks:
        from lowbit.eval.tasks import evaluate_tasks
        from lowbit.eval.tasks.report import task_json, task_rows

        res = evaluate_tasks(models, tok, tasks, progress=not a.no_progress,
                             reference="reference" if a.reference else None)
        console.print(table("zero-shot tasks (lm-eval 0.4 scoring; accuracy in %)", *task_rows(res)))
        out["tasks"] = task_json(res)
    if a.lm_eval:
        from lowbit.eval.lm_eval_bridge import format_table, run_lm_eval

        out["lm_eval"] = {}
        for n, m in models.items():
            r = run_lm_eval(m, tok, a.lm_eval.split(","), limit=a.limit, include_path=a.lm_eval_include)
            say(f"lm-eval on {n}:\n{format_table(r)}")
            out["lm_eval"][n] = {k: r[k] for k in ("results", "versions", "n-shot") if k in r}
    return out


def _eval_perplexity(a: argparse.Namespace, models: dict[str, Any], tok: Any, ctx: int) -> dict[str, Any]:
    from lowbit.eval.llamacpp import LlamaCppLogits
    from lowbit.jobs.evaluate import evaluate_models

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
    return {"corpus": corpus, "results": {
        n: {**r.to_dict(), **({"backend": "llama.cpp", "speed": speeds[n].to_dict()} if n in speeds else {})}
        for n, r in res.items()}}
