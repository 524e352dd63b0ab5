"""GPTQ quality on real models: lowbit GPTQ vs lowbit RTN vs llm-compressor's and GPTQModel's GPTQ.

    python bench/gptq_quality.py --models gemma3-270m qwen2.5-coder-0.5b --schemes W4A16 W3A16 \
        --calib-samples 128 --calib-len 512 --windows 40 --llmc-python /path/to/llmc-venv/bin/python \
        --gptqmodel --lowbit rtn gptq gptq-a0.25

Every method sees the same C4 calibration tokens (seeded) and is scored on the same WikiText-2
windows (GPTQ protocol, 2048 tokens) against the bf16 reference; lowbit's rows are evaluated from
their artifacts on disk, the peers' from the fake-quantized weights they computed (llm-compressor
in its own venv; GPTQModel, installed ``--no-deps`` in this python, from its dequantized
checkpoint). Both peers: symmetric, act-order with static groups, damp 0.01. Prints one table
(perplexity increase over the reference, and its ratio to each peer's) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from lowbit.core.io import write_json_atomic
from lowbit.core.scheme import get_scheme
from lowbit.data import calibration_tokens, resolve_calib_texts
from lowbit.formats.compressed_tensors import load_quantized
from lowbit.jobs import evaluate_models, quantize_loaded
from lowbit.methods.gptq import GPTQConfig
from lowbit.models.loader import load_model
from lowbit.pipeline.engine import Engine
from lowbit.pipeline.registry import method_entry
from lowbit.recipe import Calibration, Recipe
from peers import machine, peer_artifact, reusable_seconds

log = logging.getLogger("gptq_quality")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--schemes", nargs="+", default=["W4A16", "W3A16"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="lowbit GPTQ with act-order, static groups (default, as llm-compressor's default)")
    p.add_argument("--search", action="store_true", help="lowbit GPTQ with the H-weighted clipping search")
    p.add_argument("--refit", action="store_true", help="lowbit GPTQ refits group scales to the output error")
    p.add_argument("--lowbit", nargs="+", default=["rtn", "gptq"],
                   help="lowbit rows: rtn, gptq and GPTQ variants joined by '-': search (H-weighted clipping "
                        "search), pX (importance (H_jj / mean)^X in that search, default 1), refit (scale refit), "
                        "aX (asymmetric calibration, GPTAQ, strength X; bare gptq: the library default, a0: plain "
                        "GPTQ), res (GPTAQ on the norm-fed groups only), skip (on all but down_proj); e.g. "
                        "gptq-search-p0.5, gptq-a0.25, gptq-a0.5-skip")
    p.add_argument("--llmc-python", default=None, help="python of llm-compressor's venv (skip the peer if unset)")
    p.add_argument("--gptqmodel", action="store_true",
                   help="also GPTQModel's GPTQ (installed in this python; bench/peers/gptqmodel_gptq.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the C4 calibration sample (the same for every method)")
    p.add_argument("--reuse-peer", action="store_true",
                   help="reuse llm-compressor's artifact from an earlier run with the same --out (same tokens)")
    p.add_argument("--reuse-lowbit", action="store_true",
                   help="reuse lowbit artifacts from an earlier run with the same --out when their recipe "
                        "records the same GPTQ options (same tokens: the calibration is seeded)")
    p.add_argument("--out", default="bench/results/gptq")
    a = p.parse_args()
    mach = machine()  # at the start: the commit and versions the run used
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(a.out)
    rows: list[dict] = []
    for name in a.models:
        ref = load_model(name)
        tokens = calibration_tokens(ref.tokenizer, resolve_calib_texts("c4"), a.calib_samples, a.calib_len,
                                    seed=a.seed)
        tok_file = out / name / "calib_tokens.safetensors"
        tok_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": tokens.contiguous()}, str(tok_file))
        for sname in a.schemes:
            scheme = get_scheme(sname, group_size=a.group_size)
            models: dict[str, torch.nn.Module] = {"reference": ref.model}
            secs: dict[str, float] = {}
            for variant in a.lowbit:
                method = variant.split("-")[0]
                opts = set(variant.split("-")[1:])
                power = next((float(o[1:]) for o in opts if o.startswith("p")), 1.0)  # e.g. gptq-search-p0.5
                # e.g. gptq-a0.25 (GPTAQ at 0.25), gptq-a0 (plain GPTQ); bare gptq is the library default
                asym = next((float(o[1:]) for o in opts if o.startswith("a")), GPTQConfig().asym_alpha)
                # e.g. gptq-a0.5-res: q/k/v and gate/up only; gptq-a0.5-skip: all but down_proj
                scope = "residual" if "res" in opts else "skip-last" if "skip" in opts else "all"
                guard = next((int(o[1:]) for o in opts if o.startswith("g")), 0)  # e.g. gptq-search-g64
                cfg = GPTQConfig(act_order=a.act_order, search=a.search or "search" in opts,
                                 refit=a.refit or "refit" in opts, search_power=power, asym_alpha=asym,
                                 asym_scope=scope, search_guard=guard)
                art = out / name / f"{sname}-{variant}"
                recipe = Recipe(scheme, cfg if method == "gptq" else method_entry(method).config(),
                                Calibration("c4", a.calib_samples, a.calib_len, a.seed))
                done = reusable_seconds(art, recipe) if a.reuse_lowbit else None
                if done is None:
                    work = copy.deepcopy(ref)
                    res = quantize_loaded(work, recipe, art, engine=Engine(progress=False), force=True)
                    del work
                    done = res.seconds
                else:
                    log.info("reusing %s (quantized in %.0f s)", art, done)
                models[f"lowbit-{variant}"] = load_quantized(art)[0]
                secs[f"lowbit-{variant}"] = done
            peers = [("llmcompressor-gptq", a.llmc_python, "llmc_gptq.py", "llmcompressor"),
                     ("gptqmodel-gptq", sys.executable if a.gptqmodel else None, "gptqmodel_gptq.py", "gptqmodel")]
            for tag, python, script, folder in peers:
                if python:
                    peer_dir = out / name / f"{sname}-{folder}"
                    secs[tag] = peer_artifact(python, script, ref.path, tok_file, scheme.bits, a.group_size, peer_dir,
                                              a.reuse_peer)
                    models[tag] = load_model(str(peer_dir)).model
            corpus, res_ev = evaluate_models(models, ref.tokenizer, reference="reference", data="wikitext2",
                                             ctx=a.ctx, max_windows=a.windows, progress=False)
            base = res_ev["reference"].ppl
            for m, r in res_ev.items():
                rows.append({"model": name, "scheme": scheme.label, "method": m, "ppl": r.ppl,
                             "ppl_increase": r.ppl - base, "kld": r.kld_mean, "top1": r.top1,
                             "quantize_seconds": secs.get(m), "windows": r.n_windows, "tokens": r.n_tokens})
            del models
            write_json_atomic(out / "gptq_quality.json", {"args": vars(a), "machine": mach, "rows": rows})
    table = Table(title=f"WikiText-2 (gptq protocol, {a.windows} x {a.ctx}), C4 calibration "
                        f"{a.calib_samples} x {a.calib_len}")
    for c in ("model", "scheme", "method", "ppl", "Δppl", "Δ / llmc Δ", "Δ / GPTQModel Δ", "KLD", "top-1", "quant s"):
        table.add_column(c)

    def ratio(r: dict, peer_method: str) -> str:
        peer = next((x for x in rows if x["model"] == r["model"] and x["scheme"] == r["scheme"]
                     and x["method"] == peer_method), None)
        return "-" if peer is None or r["method"] == "reference" else f"{r['ppl_increase'] / peer['ppl_increase']:.2f}"

    for r in rows:
        table.add_row(r["model"], r["scheme"], r["method"], f"{r['ppl']:.4f}", f"{r['ppl_increase']:+.4f}",
                      ratio(r, "llmcompressor-gptq"), ratio(r, "gptqmodel-gptq"),
                      "-" if r["kld"] is None else f"{r['kld']:.4f}", "-" if r["top1"] is None else f"{r['top1']:.4f}",
                      "-" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.0f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
