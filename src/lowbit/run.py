"""``lowbit run``: the main job. Quantize the default model with the default schemes, evaluate
every artifact from disk against the reference on one corpus, print a table and write
``report.json`` and ``report.md``."""

from __future__ import annotations

import copy
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import __version__
from lowbit.core.io import write_json_atomic, write_text_atomic
from lowbit.core.scheme import QuantScheme, get_scheme
from lowbit.formats.registry import load_artifact
from lowbit.jobs.evaluate import evaluate_models
from lowbit.jobs.quantization import quantize_loaded
from lowbit.models.loader import load_model, model_size_bytes
from lowbit.models.sources import DEFAULT_SOURCE
from lowbit.pipeline.engine import Engine
from lowbit.pipeline.registry import method_entry
from lowbit.recipe.schema import Calibration, Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunEntry:
    name: str
    preset: str
    method: str
    group_size: int | None | str = "auto"  # "auto": the preset's, lowered until it divides every linear


DEFAULT_ENTRIES = (
    RunEntry("W8A16-rtn", "W8A16", "rtn", None),
    RunEntry("W4A16-rtn", "W4A16", "rtn"),
    RunEntry("W4A16-imatrix-rtn", "W4A16", "imatrix-rtn"),
)


def fitting_group_size(model: nn.Module, preferred: int) -> int:
    """The largest power-of-two group size <= ``preferred`` dividing the input dim of every linear."""
    dims = {m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    g = preferred
    while g > 1 and any(d % g for d in dims):
        g //= 2
    return g


def _scheme(entry: RunEntry, model: nn.Module) -> QuantScheme:
    base = get_scheme(entry.preset)
    if entry.group_size != "auto":
        return base.with_options(group_size=entry.group_size)
    if base.group_size is None:
        return base
    return base.with_options(group_size=fitting_group_size(model, base.group_size))


def run_main(model: str = DEFAULT_SOURCE, out: str | Path | None = None, *, entries: tuple[RunEntry, ...] =
             DEFAULT_ENTRIES, data: str | None = None, protocol: str = "gptq", ctx: int = 2048,
             windows: int = 3, calib: str | None = None, calib_samples: int = 16, calib_len: int = 512,
             progress: bool = True) -> dict[str, Any]:
    """Run the main job; returns the report (also written to ``out``)."""
    t_start = time.perf_counter()
    ref = load_model(model)
    out = Path(out or Path("runs") / ref.name)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = [{
        "name": "reference", "scheme": f"{str(ref.storage_dtype).removeprefix('torch.')} (unquantized)",
        "method": "-", "bits_per_weight": float(torch.finfo(ref.storage_dtype).bits),
        "size_bytes": model_size_bytes(ref.path), "quantize_seconds": 0.0, "path": str(ref.path),
    }]
    notes = []
    for e in entries:
        scheme = _scheme(e, ref.model)
        if scheme.group_size != get_scheme(e.preset).group_size:
            notes.append(f"{e.name}: group size {scheme.group_size} (the preset's {get_scheme(e.preset).group_size} "
                         "does not divide every linear's input dimension of this model)")
        work = copy.deepcopy(ref)
        log.info("quantizing %s: %s with %s", e.name, scheme.label, e.method)
        recipe = Recipe(scheme, method_entry(e.method).config(), Calibration(calib, calib_samples, calib_len))
        res = quantize_loaded(work, recipe, out / e.name, engine=Engine(device="cpu", progress=progress), force=True)
        calib = calib or res.recipe.calibration.corpus
        del work
        rows.append({"name": e.name, "scheme": scheme.label, "method": e.method,
                     "bits_per_weight": res.bits_per_weight, "size_bytes": res.size_bytes,
                     "quantize_seconds": res.seconds, "path": str(res.path), "kept_16bit": res.kept})
    models: dict[str, nn.Module] = {"reference": ref.model}
    for r in rows[1:]:
        models[r["name"]] = load_artifact(r["path"])  # evaluate what was written
    corpus, results = evaluate_models(models, ref.tokenizer, reference="reference", data=data,
                                      protocol=protocol, ctx=ctx, max_windows=windows, progress=progress)
    ref_ppl = results["reference"].ppl
    for r in rows:
        ev = results[r["name"]]
        r.update({"ppl": ev.ppl, "ppl_delta": ev.ppl - ref_ppl, "kld": ev.kld_mean, "kld_p99": ev.kld_p99,
                  "top1": ev.top1, "eval_seconds": ev.seconds})
    first = results["reference"]
    report = {
        "lowbit_version": __version__, "model": ref.name, "model_path": str(ref.path),
        "eval": {"corpus": corpus, "protocol": protocol, "ctx": ctx, "windows": first.n_windows,
                 "tokens_scored": first.n_tokens,
                 "why": (f"first {first.n_windows} windows of {ctx} tokens: sized so the whole job finishes "
                         "in under 10 minutes on a 2-core CPU; pass --windows for more") if windows == 3 and ctx == 2048
                 else f"first {first.n_windows} windows of {ctx} tokens (--windows {windows})"},
        "calibration": {"corpus": calib, "samples": calib_samples, "seq_len": calib_len,
                        "used_by": [e.name for e in entries if e.method != "rtn"]},
        "rows": rows, "notes": notes,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                    "torch": torch.__version__},
        "total_seconds": time.perf_counter() - t_start,
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report))
    return report


COLUMNS = ("name", "method", "scheme", "bits/w", "size MB", "ppl", "Δppl", "KLD", "top-1", "quant s", "eval s")


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)
    return [[r["name"], r["method"], r["scheme"], f(r["bits_per_weight"], ".2f"), f(r["size_bytes"] / 1e6, ".1f"),
             f(r["ppl"], ".4f"), f(r["ppl_delta"], "+.4f"), f(r["kld"], ".5f"), f(r["top1"], ".4f"),
             f(r["quantize_seconds"], ".1f"), f(r["eval_seconds"], ".1f")] for r in report["rows"]]


def render_markdown(report: dict[str, Any]) -> str:
    ev = report["eval"]
    lines = [f"# lowbit report: {report['model']}", "",
             f"Perplexity protocol **{ev['protocol']}** on **{ev['corpus']}**: {ev['windows']} windows of "
             f"{ev['ctx']} tokens, {ev['tokens_scored']} tokens scored ({ev['why']}). KLD is the mean "
             "KL(reference || quantized) per token; top-1 is the share of tokens where both pick the same "
             "next token. Every quantized row was evaluated from its folder on disk.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    cal = report["calibration"]
    lines += ["", f"Calibration ({', '.join(cal['used_by']) or 'unused'}): {cal['corpus']}, "
              f"{cal['samples']} x {cal['seq_len']} tokens."]
    lines += [f"- {n}" for n in report["notes"]]
    lines += ["", f"lowbit {report['lowbit_version']}, {report['machine']['platform']}, "
              f"{report['machine']['cpus']} threads, torch {report['machine']['torch']}; "
              f"total {report['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
