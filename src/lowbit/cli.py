"""Command line: ``lowbit run | quantize | eval | models``, plus GGUF (cli_gguf) and serving (cli_serve).

Errors on bad input (:class:`~lowbit.core.errors.LowbitError`) print one clear line and exit 2.
"""

from __future__ import annotations

from lowbit.cudaenv import tune_pinned_allocator

tune_pinned_allocator()  # before torch loads: it reads its allocator settings once

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from lowbit import __version__
from lowbit.core.dtypes import DT_PRESETS, get_dt_scheme, is_datatype_scheme
from lowbit.core.errors import LowbitError
from lowbit.core.io import write_json_atomic
from lowbit.core.scheme import PRESETS, get_scheme

console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize, evaluate and export low-bit LLMs.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="main job: quantize the default model with several schemes, evaluate, report")
    r.add_argument("model", nargs="?", default=None, help="model (default: smollm2-135m, offline)")
    r.add_argument("-o", "--out", default=None, help="output folder (default: runs/MODEL)")
    r.add_argument("--data", default=None, help="evaluation corpus: wikitext2 | python-docs | PATH")
    r.add_argument("--protocol", default="gptq", choices=["gptq", "llamacpp"])
    r.add_argument("--ctx", type=int, default=2048)
    r.add_argument("--windows", type=int, default=3, help="evaluation windows (default 3: fits 10 min on 2 cores)")
    r.add_argument("--calib", default=None, help="calibration: c4 | c4:PATH | python-docs | PATH")
    r.add_argument("--calib-samples", type=int, default=16)
    r.add_argument("--calib-len", type=int, default=512)

    q = sub.add_parser("quantize", help="quantize a model and write a compressed-tensors folder")
    q.add_argument("model", help="offline source name, model folder, .gguf file or hub id")
    q.add_argument("--scheme", required=True, help=f"one of {', '.join([*PRESETS, *DT_PRESETS])}")
    q.add_argument("--group-size", type=int, default=None,
                   help="group size; -1 for per-channel (default: the preset's); NF4/FP4: absmax block "
                        "(default 64); FP8: N for NxN weight blocks (default per-channel)")
    q.add_argument("--method", default="rtn", choices=["rtn", "imatrix-rtn", "gptq", "awq", "awq+gptq",
                                                             "smoothquant"])
    q.add_argument("--alpha", type=float, default=None,
                   help="SmoothQuant migration strength in [0, 1] (default 0.5); with --method smoothquant")
    q.add_argument("--mse", action="store_true", help="search the clipping range of each group (MSE)")
    q.add_argument("--calib", default=None, help="calibration: c4 | c4:PATH | python-docs | PATH (default c4)")
    q.add_argument("--calib-samples", type=int, default=128)
    q.add_argument("--calib-len", type=int, default=None, help="tokens per sample (default: 2048 gptq, 512 else)")
    w = q.add_argument_group("AWQ")
    w.add_argument("--awq-save", default=None, help="write the AWQ search result (scales, clips) to this file")
    w.add_argument("--awq-load", default=None, help="apply a saved AWQ search result instead of searching")
    w.add_argument("--awq-clip", action=argparse.BooleanOptionalAction, default=False,
                   help="AWQ's clipping search after the scales (default off: it helped Gemma-3-270M W3 but "
                        "raised Qwen2.5-Coder-0.5B's W3 and W4 perplexity)")
    w.add_argument("--awq-objective", default="parent", choices=["parent", "linear"],
                   help="what the scale search minimises: parent = output error of the module holding the "
                        "group (attention for q/k/v, MLP for gate/up; default), linear = the linears' own "
                        "output error (faster)")
    from lowbit.pipeline.awq import AWQMethod

    w.add_argument("--awq-tokens", type=int, default=AWQMethod.max_tokens,
                   help=f"calibration tokens the scale search scores (default {AWQMethod.max_tokens}; 2048 searches "
                        "~7x faster on a CPU but raised Qwen2.5-Coder-0.5B W3's perplexity increase from +19.3 to "
                        "+23.9)")
    q.add_argument("--format", default="auto", choices=["auto", "awq"],
                   help="auto: compressed-tensors (bitsandbytes for NF4/FP4/INT8-LLM); awq: AutoAWQ GEMM layout "
                        "(4-bit grouped, e.g. W4A16_ASYM)")
    d = q.add_argument_group("data types (NF4, FP4, INT8-LLM, FP8, FP8_DYNAMIC)")
    d.add_argument("--double-quant", action="store_true", help="NF4/FP4: quantize the absmax values to 8 bits")
    d.add_argument("--threshold", type=float, default=None, help="INT8-LLM: activation outlier threshold (6.0)")
    g = q.add_argument_group("GPTQ")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize columns by decreasing Hessian diagonal (default on, static groups)")
    g.add_argument("--dynamic-groups", action="store_true",
                   help="with --act-order: groups follow the permuted order (stores g_idx; older loaders only)")
    g.add_argument("--damp", type=float, default=0.01, help="dampening, fraction of the mean Hessian diagonal")
    g.add_argument("--refit", action="store_true",
                   help="after GPTQ, refit the group scales to the layer output error (codes fixed)")
    g.add_argument("--asym-alpha", type=float, default=0.5, metavar="ALPHA",
                   help="asymmetric calibration (GPTAQ): aim each layer at the float model's output, with this "
                        "strength in [0, 1] (default 0.5; 0 = plain GPTQ, about 25%% less time on a GPU); a "
                        "float run of the block beside the quantized one and an in x in matrix per aimed group")
    from lowbit.methods.gptq import ASYM_SCOPES, GPTQConfig

    g.add_argument("--asym-scope", choices=ASYM_SCOPES, default=GPTQConfig.asym_scope,
                   help="the groups of linears asymmetric calibration aims: all; skip-last (default): all but "
                        "down_proj (no in x in matrix beside its Hessian and no float run up to it: plain GPTQ's "
                        "peak memory); residual: only q/k/v and gate/up")
    g.add_argument("--mse-power", type=float, default=1.0, metavar="P",
                   help="with --mse: weight each column's error by (H_jj / mean H_jj)^P in the search (default 1; "
                        "0.5 damps the importance)")
    g.add_argument("--mse-guard", type=int, default=0, metavar="N",
                   help="with --mse: keep a layer's search only if the worst output error over its N largest-norm "
                        "calibration tokens does not grow (default 0: always keep it)")
    g.add_argument("--block-size", type=int, default=128, help="lazy-update block size")
    g.add_argument("--no-true-sequential", action="store_true", help="one Hessian pass per block")
    g.add_argument("--hessians-on-cpu", action="store_true", help="keep Hessians in CPU memory")
    q.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations in CPU memory (device memory: about one block)")
    q.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype of scales and unquantized tensors (default: the model's, bf16 for GGUF input)")
    q.add_argument("--device", default="auto", help="device for calibration: auto (GPU if any), cpu, cuda:1 ...")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("-o", "--out", required=True, help="output folder")
    q.add_argument("--force", action="store_true", help="replace a non-empty output folder")

    e = sub.add_parser("eval", help="evaluate a quantized folder (or any model) against a reference")
    e.add_argument("model", help="artifact folder written by lowbit quantize, or any model spec")
    e.add_argument("--reference", default=None, help="reference model for KLD and top-1")
    e.add_argument("--data", default=None, help="wikitext2 | python-docs | PATH (default: wikitext2 if found)")
    e.add_argument("--protocol", default="gptq", choices=["gptq", "llamacpp"])
    e.add_argument("--ctx", type=int, default=None, help="window (default: 2048 gptq, 512 llamacpp)")
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.add_argument("--backend", default="auto", choices=["auto", "llamacpp", "transformers"],
                   help="how a .gguf MODEL runs: llama.cpp (adds prefill/decode tokens/s) or dequantized by "
                        "transformers; auto: llama.cpp when llama-cpp-python is installed")
    e.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: torch's thread count)")

    sub.add_parser("models", help="list the offline model sources")
    from lowbit import cli_gguf, cli_serve

    EXTRA.update(cli_gguf.register(sub))
    EXTRA.update(cli_serve.register(sub))
    return p


EXTRA: dict[str, Any] = {}  # handlers of the sub-commands registered by cli_gguf / cli_serve


_TEXT_COLUMNS = ("name", "method", "scheme", "model", "architecture", "gguf", "licence", "cached")


def _table(title: str, columns: tuple[str, ...] | list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c in _TEXT_COLUMNS else "right")
    for row in rows:
        t.add_row(*row)
    return t


def cmd_run(a: argparse.Namespace) -> None:
    from lowbit.models.sources import DEFAULT_SOURCE
    from lowbit.run import COLUMNS, run_main, table_rows

    rep = run_main(a.model or DEFAULT_SOURCE, a.out, data=a.data, protocol=a.protocol, ctx=a.ctx,
                   windows=a.windows, calib=a.calib, calib_samples=a.calib_samples, calib_len=a.calib_len,
                   progress=not a.no_progress)
    ev = rep["eval"]
    console.print(_table(f"{rep['model']}: {ev['protocol']} ppl on {ev['corpus']}, {ev['windows']}x{ev['ctx']} "
                         f"tokens", COLUMNS, table_rows(rep)))
    for n in rep["notes"]:
        console.print(f"note: {n}")
    out = Path(rep["rows"][1]["path"]).parent if len(rep["rows"]) > 1 else Path(".")
    console.print(f"report: {out / 'report.md'} and {out / 'report.json'} ({rep['total_seconds']:.0f} s)")


def cmd_quantize(a: argparse.Namespace) -> None:
    from lowbit.jobs import DTYPES, quantize

    kw = {} if a.group_size is None else {"group_size": a.group_size}
    if a.alpha is not None and a.method != "smoothquant":
        raise LowbitError("--alpha goes with --method smoothquant")
    scheme: Any
    if is_datatype_scheme(a.scheme):
        if a.method != "rtn":
            raise LowbitError(f"{a.scheme} is a data-type scheme: it has its own rounding, so --method "
                              f"{a.method} does not apply; drop --method")
        scheme = get_dt_scheme(a.scheme, **({} if a.group_size is None else {"block_size": a.group_size}),
                               double_quant=a.double_quant or None, threshold=a.threshold)
    else:
        if a.double_quant or a.threshold is not None:
            raise LowbitError("--double-quant and --threshold apply to the data-type schemes (NF4/FP4, INT8-LLM)")
        scheme = get_scheme(a.scheme, **kw)
    from lowbit.methods.gptq import GPTQConfig

    gptq = GPTQConfig(damp=a.damp, block_size=a.block_size, act_order=a.act_order,
                      static_groups=not a.dynamic_groups, search=a.mse, refit=a.refit, asym_alpha=a.asym_alpha,
                      search_power=a.mse_power, search_guard=a.mse_guard, asym_scope=a.asym_scope)
    calib_len = a.calib_len or (2048 if a.method.endswith("gptq") else 512)
    device = a.device
    if device == "auto":
        import torch

        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    res = quantize(a.model, scheme, a.out, method=a.method, calib=a.calib, calib_samples=a.calib_samples,
                   calib_len=calib_len, search=a.mse, dtype=DTYPES[a.dtype] if a.dtype else None,
                   device=device, force=a.force, seed=a.seed, progress=not a.no_progress, gptq=gptq,
                   true_sequential=not a.no_true_sequential, hessians_on_cpu=a.hessians_on_cpu,
                   offload_activations=a.offload_activations, awq_save=a.awq_save, awq_load=a.awq_load,
                   awq_clip=a.awq_clip, awq_objective=a.awq_objective, awq_options={"max_tokens": a.awq_tokens},
                   export_format=a.format, alpha=0.5 if a.alpha is None else a.alpha)
    console.print(f"wrote {res.path}: {res.n_linears} linears {scheme.label} by {res.method} in {res.seconds:.1f} s, "
                  f"{res.bits_per_weight:.3f} bits/weight, {res.size_bytes / 1e6:.1f} MB; "
                  f"kept in 16-bit: {', '.join(res.kept) or 'none'}")


def cmd_eval(a: argparse.Namespace) -> None:
    from lowbit.eval.llamacpp import LlamaCppLogits, resolve_backend
    from lowbit.jobs import evaluate_models, load_any

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
    console.print(_table(f"{a.protocol} protocol, {corpus}, {first.n_windows} windows of {ctx} tokens", columns, rows))
    if a.json:
        write_json_atomic(a.json, {"corpus": corpus, "results": {
            n: {**r.to_dict(), **({"backend": "llama.cpp", "speed": speeds[n].to_dict()} if n in speeds else {})}
            for n, r in res.items()}})


def cmd_models(a: argparse.Namespace) -> None:
    from lowbit.models.sources import SOURCES, cache_root

    rows = [[name, src.architecture, src.gguf_file, src.license,
             "yes" if (cache_root() / "models" / name).is_dir() else "no"] for name, src in SOURCES.items()]
    console.print(_table(f"offline model sources (cache: {cache_root()})",
                         ["model", "architecture", "gguf", "licence", "cached"], rows))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from lowbit.pipeline.distributed import init_from_env, world

    init_from_env()  # under torchrun: data-parallel calibration
    if world()[0] != 0:  # only rank 0 talks
        a.no_progress = True
        console.quiet = True
    level = logging.DEBUG if a.verbose else logging.INFO if world()[0] == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        {"run": cmd_run, "quantize": cmd_quantize, "eval": cmd_eval, "models": cmd_models, **EXTRA}[a.command](a)
    except LowbitError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
