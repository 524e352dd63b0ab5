"""AWQ (and SmoothQuant) quality on real models, side by side with llm-compressor's AWQModifier.

    python bench/awq_quality.py --models gemma3-270m qwen2.5-coder-0.5b --schemes W4A16_ASYM W3A16_ASYM \
        --calib-samples 128 --calib-len 512 --windows 4 --llmc-python /tmp/venv-llmc/bin/python

Every method sees the same C4 calibration tokens (seeded) and is scored on the same WikiText-2
windows (GPTQ protocol) against the float reference. Rows per model and scheme: lowbit RTN,
lowbit AWQ (then RTN), lowbit AWQ+GPTQ, llm-compressor AWQ (then its RTN) and, with
``--autoawq-python``, AutoAWQ (scales and its clipping search, then its RTN). lowbit's rows are
evaluated from their artifacts on disk, the peers' from their fake-quantized weights.
With ``--smoothquant``, W8A8 dynamic-int8 RTN and SmoothQuant W8A8 rows are added per model.
Prints one table (perplexity increase, its ratio to llm-compressor's) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from lowbit.core.io import write_json_atomic
from lowbit.core.scheme import get_scheme
from lowbit.data import calibration_tokens, resolve_calib_texts
from lowbit.jobs import evaluate_models, load_artifact, quantize_loaded
from lowbit.models.loader import load_model
from lowbit.pipeline.engine import Engine
from lowbit.pipeline.registry import method_entry
from lowbit.recipe import AWQConfig, Calibration, GPTQConfig, Recipe, SmoothQuantConfig
from peers import machine, peer_artifact, reusable_seconds

log = logging.getLogger("awq_quality")


#: bench-only method names that pin the clipping search: name -> (method, clip)
CLIP_VARIANTS = {"awq-clip": ("awq", True), "awq-noclip": ("awq", False),
                 "awq+gptq-clip": ("awq+gptq", True), "awq+gptq-noclip": ("awq+gptq", False)}
#: trailing options: "-linear" scores the scale search by the linears' own outputs (not their parent
#: module's), "-t<N>" scores N tokens (default AWQMethod.max_tokens), "-both" tries both duo-scaling
#: grids, "-float" passes on each block's float outputs (AutoAWQ) instead of its quantized ones


def parse_variant(variant: str) -> tuple[str, str, dict[str, Any]]:
    """``awq-clip-t8192-both`` -> (``awq-clip``, objective, AWQMethod options)."""
    objective, opts = "parent", {}
    while True:
        head, _, last = variant.rpartition("-")
        if last == "linear":
            objective = "linear"
        elif last == "both":
            opts["duo_scaling"] = "both"
        elif last == "float":
            opts["propagate"] = "float"
        elif last[:1] == "t" and last[1:].isdigit():
            opts["max_tokens"] = int(last[1:])
        else:
            return variant, objective, opts
        variant = head


def lowbit_rows(ref: Any, scheme: Any, methods: list[str], out: Path, a: argparse.Namespace
                ) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    models, secs = {}, {}
    runs = [(m, None) for m in methods if m != "smoothquant"]
    runs += [("smoothquant", al) for al in (a.alphas if "smoothquant" in methods else [])]
    for variant, alpha in runs:
        tag = variant if alpha is None or len(a.alphas) == 1 else f"{variant}-a{alpha:g}"
        base, objective, opts = parse_variant(variant)
        method, clip = CLIP_VARIANTS.get(base, (base, a.awq_clip))
        art = out / f"{scheme.name}-{tag}"
        recipe = Recipe(scheme, _method(method, clip, objective, opts, alpha),
                        Calibration("c4", a.calib_samples, a.calib_len))
        done = reusable_seconds(art, recipe) if a.reuse_lowbit and alpha is None else None
        if done is None:
            work = copy.deepcopy(ref)
            res = quantize_loaded(work, recipe, art, engine=Engine(progress=False), force=True)
            del work
            done = res.seconds
            log.info("%s %s: %.0f s", scheme.name, tag, done)
        else:
            log.info("reusing %s (quantized in %.0f s)", art, done)
        models[f"lowbit-{tag}"] = load_artifact(art)
        secs[f"lowbit-{tag}"] = done
    return models, secs


def _method(method: str, clip: bool, objective: str, opts: dict[str, Any], alpha: float | None) -> Any:
    """The method config of a bench variant."""
    if method in ("awq", "awq+gptq"):
        return AWQConfig(clip=clip, objective=objective, inner=GPTQConfig() if method == "awq+gptq" else None, **opts)
    if method == "smoothquant":
        return SmoothQuantConfig(alpha=0.5 if alpha is None else alpha)
    return method_entry(method).config()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--schemes", nargs="*", default=["W4A16_ASYM", "W3A16_ASYM"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--methods", nargs="+", default=["rtn", "awq", "awq+gptq"],
                   help=f"lowbit methods; also {', '.join(CLIP_VARIANTS)} to pin the clipping search; a "
                        "'-linear' suffix scores the scale search by the linears' own outputs")
    p.add_argument("--smoothquant", action="store_true", help="also W8A8 RTN vs SmoothQuant W8A8 (dynamic int8)")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.5], help="SmoothQuant migration strengths")
    p.add_argument("--awq-clip", action=argparse.BooleanOptionalAction, default=False,
                   help="lowbit AWQ's clipping search (off by default, as in the CLI)")
    p.add_argument("--llmc-python", default=None, help="python of llm-compressor's venv (skip the peer if unset)")
    p.add_argument("--autoawq-python", default=None,
                   help="python of AutoAWQ's venv (autoawq 0.2.9 + transformers 4.51; skip the peer if unset)")
    p.add_argument("--reuse-peer", action="store_true",
                   help="reuse the peers' artifacts from an earlier run with the same --out (same tokens)")
    p.add_argument("--reuse-lowbit", action="store_true",
                   help="reuse lowbit AWQ artifacts from an earlier run with the same --out when their recipe "
                        "records the same calibration and search options")
    p.add_argument("--out", default="bench/results/awq")
    a = p.parse_args()
    mach = machine()  # at the start: the commit and versions the run used
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(a.out)
    rows: list[dict[str, Any]] = []
    for name in a.models:
        ref = load_model(name)
        tokens = calibration_tokens(ref.tokenizer, resolve_calib_texts("c4"), a.calib_samples, a.calib_len, seed=0)
        tok_file = out / name / "calib_tokens.safetensors"
        tok_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": tokens.contiguous()}, str(tok_file))
        runs: list[tuple[str, Any, list[str]]] = [
            (s, get_scheme(s, group_size=a.group_size), a.methods) for s in a.schemes]
        if a.smoothquant:
            runs.append(("W8A8", get_scheme("W8A8"), ["rtn", "smoothquant"]))
        for sname, scheme, methods in runs:
            models: dict[str, torch.nn.Module] = {"reference": ref.model}
            got, secs = lowbit_rows(ref, scheme, methods, out / name, a)
            models.update(got)
            peers = [("llmcompressor-awq", a.llmc_python, "llmc_awq.py"),
                     ("autoawq", a.autoawq_python, "autoawq_awq.py")]
            for tag, python, script in peers:
                if python and scheme.act_bits is None:
                    peer_dir = out / name / f"{sname}-{tag}"
                    secs[tag] = peer_artifact(python, script, ref.path, tok_file, scheme.bits, a.group_size, peer_dir,
                                              a.reuse_peer)
                    models[tag] = load_model(str(peer_dir)).model
            corpus, res_ev = evaluate_models(models, ref.tokenizer, reference="reference", data="wikitext2",
                                             ctx=a.ctx, max_windows=a.windows, progress=False)
            base = res_ev["reference"].ppl
            for m, r in res_ev.items():
                rows.append({"model": name, "scheme": scheme.label, "method": m, "ppl": r.ppl,
                             "ppl_increase": r.ppl - base, "rel_increase": (r.ppl - base) / base, "kld": r.kld_mean,
                             "top1": r.top1, "quantize_seconds": secs.get(m), "windows": r.n_windows,
                             "tokens": r.n_tokens})
            del models
            write_json_atomic(out / "awq_quality.json", {"args": vars(a), "machine": mach, "rows": rows})
    table = Table(title=f"WikiText-2 (gptq protocol, {a.windows} x {a.ctx}), C4 calibration "
                        f"{a.calib_samples} x {a.calib_len}")
    for c in ("model", "scheme", "method", "ppl", "Δppl", "Δ%", "Δ / llmc Δ", "KLD", "top-1", "quant s"):
        table.add_column(c)
    for r in rows:
        peer = next((x for x in rows if x["model"] == r["model"] and x["scheme"] == r["scheme"]
                     and x["method"] == "llmcompressor-awq"), None)
        ratio = "-" if peer is None or r["method"] == "reference" else f"{r['ppl_increase'] / peer['ppl_increase']:.2f}"
        table.add_row(r["model"], r["scheme"], r["method"], f"{r['ppl']:.4f}", f"{r['ppl_increase']:+.4f}",
                      f"{100 * r['rel_increase']:+.2f}", ratio,
                      "-" if r["kld"] is None else f"{r['kld']:.4f}", "-" if r["top1"] is None else f"{r['top1']:.4f}",
                      "-" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.0f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
