"""QAT against PTQ on real models, side by side: how much of RTN's and GPTQ's perplexity gap QAT recovers.

    python bench/qat.py --models smollm2-135m gemma3-270m --steps 300 --windows 8

Per model (scheme from ``TARGETS``) the rows are: RTN, GPTQ (C4 calibration), QAT from each (``lowbit.qat.run``:
KD from the float model on C4 windows, checked disjoint from both evaluation corpora), and QAT from GPTQ
with the layer groups a sensitivity measure ranks worst kept 16-bit, paid for by coarser groups elsewhere
so that the weights take the same bits (``--protect``). Every artifact is evaluated from disk against the
float reference on the same windows of WikiText-2 and of a second corpus (CPython's docs, eval split):

    recovered = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_reference)

Sensitivity (``--protect``): for each group of linears sharing an input (q/k/v, o, gate/up, down of each
block), the KL divergence to the float model on calibration windows when that group alone is RTN-quantized.
Timings are wall-clock on whatever machine runs it; the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lowbit.core.io import write_json_atomic
from lowbit.core.scheme import QuantScheme, get_scheme
from lowbit.data import calibration_tokens, resolve_calib_texts
from lowbit.jobs import evaluate_models, quantize
from lowbit.jobs.artifacts import load
from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.rtn import fake_quantize
from lowbit.models.archs import get_arch
from lowbit.models.loader import load_model, model_size_bytes
from lowbit.pipeline.engine import Engine
from lowbit.pipeline.quantize import named_linears
from lowbit.qat import run as qat_run
from lowbit.qat.blocks import BlockConfig
from lowbit.qat.job import QATConfig
from lowbit.qat.train import TrainConfig, kd_loss
from lowbit.recipe import Calibration, Override, Recipe

log = logging.getLogger("qat_bench")

# model -> (preset, group size, symmetric, largest group size of the protected run's other layers)
TARGETS = {"smollm2-135m": ("W3A16", 64, True, 192), "gemma3-270m": ("W4A16", 128, False, 512)}


def largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, cap + 1) if n % d == 0)


def group_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of linears sharing an input, per block, in order (the architecture table's groups)."""
    spec = get_arch(model)
    names = [n for n, _ in named_linears(model, spec)]
    out: list[list[str]] = []
    for b in sorted({int(n[len(spec.blocks) + 1:].split(".")[0]) for n in names}):
        prefix = f"{spec.blocks}.{b}."
        block = [n for n in names if n.startswith(prefix)]
        grouped: set[str] = set()
        for g in spec.groups:
            full = [prefix + x for x in g.linears if prefix + x in block]
            if full:
                out.append(full)
                grouped.update(full)
        out.extend([n] for n in block if n not in grouped)
    return out


@torch.no_grad()
def sensitivity(model: torch.nn.Module, tokens: torch.Tensor, scheme: QuantScheme) -> dict[tuple[str, ...], float]:
    """KL(float || model with only this group RTN-quantized) on ``tokens``, per group of linears."""
    ref = model(tokens).logits
    out = {}
    for g in group_names(model):
        mods = [model.get_submodule(n) for n in g]
        saved = [m.weight.data.clone() for m in mods]
        for m in mods:
            m.weight.data.copy_(fake_quantize(m.weight.data, scheme, torch.bfloat16))
        out[tuple(g)] = float(kd_loss(model(tokens).logits, ref))
        for m, w in zip(mods, saved, strict=True):
            m.weight.data.copy_(w)
    return out


def protected_recipe(model: torch.nn.Module, base: Recipe, scores: dict[tuple[str, ...], float], max_gs: int
                     ) -> tuple[Recipe, dict[str, Any]]:
    """``base`` with the worst-ranked groups kept 16-bit and every other linear at the largest group size <= max_gs
    dividing its input, so that the weights take no more bits than under ``base`` (scales 16-bit, zero points
    of ``bits`` bits)."""
    s = base.scheme
    assert isinstance(s, QuantScheme) and s.group_size is not None
    lin = dict(named_linears(model, get_arch(model)))

    def bpw(gs: int) -> float:
        return s.bits + (16 + (0 if s.symmetric else s.bits)) / gs

    size = {n: m.weight.numel() for n, m in lin.items()}
    new_gs = {n: largest_divisor(m.in_features, max_gs) for n, m in lin.items()}
    budget = sum(size[n] * (bpw(s.group_size) - bpw(new_gs[n])) for n in lin)
    kept: list[str] = []
    for g, _ in sorted(scores.items(), key=lambda kv: -kv[1]):
        cost = sum(size[n] * (16 - bpw(new_gs[n])) for n in g)
        if cost <= budget:
            kept.extend(g)
            budget -= cost
    by_gs: dict[int, list[str]] = {}
    for n in lin:
        if n not in kept:
            by_gs.setdefault(new_gs[n], []).append(n)
    overrides = tuple(Override(tuple(ns), scheme=s.with_options(group_size=gs)) for gs, ns in sorted(by_gs.items())
                      if gs != s.group_size)
    total = sum(size.values())
    bits = sum(16 * size[n] if n in kept else size[n] * bpw(new_gs[n]) for n in lin)
    info = {"kept": kept, "kept_weights": sum(size[n] for n in kept) / total, "bits_per_weight": bits / total,
            "base_bits_per_weight": bpw(s.group_size), "group_sizes": {str(k): len(v) for k, v in by_gs.items()}}
    return dataclasses.replace(base, ignore=tuple(kept), overrides=overrides), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(TARGETS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--scale-lr", type=float, default=TrainConfig.scale_lr)
    p.add_argument("--zero-lr", type=float, default=TrainConfig.zero_lr)
    p.add_argument("--block-epochs", type=int, default=0, help="Block-AP passes before the end-to-end phase")
    p.add_argument("--block-samples", type=int, default=64)
    p.add_argument("--block-lr", type=float, default=BlockConfig.lr)
    p.add_argument("--block-scale-lr", type=float, default=BlockConfig.scale_lr)
    p.add_argument("--freeze-weights", action="store_true", help="end to end: scales/zeros only, codes frozen")
    p.add_argument("--init", default="auto", choices=["auto", "project", "ptq"])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--second", default="python-docs", help="the second evaluation corpus")
    p.add_argument("--rows", nargs="+", default=["rtn", "gptq", "rtn+qat", "gptq+qat", "gptq+qat+protect"])
    p.add_argument("--work", default="/tmp/lowbit-qat-bench", help="artifacts go here")
    p.add_argument("--json", default="bench/results/qat/qat.json")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    out: dict[str, Any] = {"args": vars(a), "threads": torch.get_num_threads(), "models": {}}
    for name in a.models:
        out["models"][name] = bench_model(name, a)
        write_json_atomic(a.json, out)
    show(out)


def bench_model(name: str, a: argparse.Namespace) -> dict[str, Any]:
    preset, gs, sym, max_gs = TARGETS[name]
    scheme = get_scheme(preset, group_size=gs, symmetric=sym)
    cal = Calibration("c4", a.calib_samples, a.calib_len, 0)
    recipes = {"rtn": Recipe(scheme), "gptq": Recipe(scheme, GPTQConfig(), cal)}
    work = Path(a.work) / name
    engine = Engine(device="cpu", progress=True)
    cfg = QATConfig(TrainConfig(steps=a.steps, lr=a.lr, scale_lr=a.scale_lr, zero_lr=a.zero_lr, log_every=25),
                    BlockConfig(epochs=a.block_epochs, samples=a.block_samples, lr=a.block_lr,
                                scale_lr=a.block_scale_lr),
                    samples=a.samples, seq_len=a.seq_len, train_weights=not a.freeze_weights, init=a.init)
    rows: dict[str, Any] = {}
    res: dict[str, Any] = {"scheme": scheme.label, "rows": rows}
    for row in a.rows:
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        path = work / row
        info: dict[str, Any] = {}
        if row in recipes:
            quantize(name, recipes[row], path, engine=engine, force=True)
        else:
            base = recipes[row.split("+")[0]]
            if row.endswith("+protect"):
                base, info = protect(name, base, scheme, max_gs, a)
            r = qat_run(name, base, path, cfg, engine=engine, force=True)  # checks the windows miss WikiText-2
            info.update(train_seconds=r.train_seconds, ptq_seconds=r.ptq_seconds, loss_first10=r.loss_first,
                        loss_last10=r.loss_last, steps=r.steps, overlap_wikitext2=r.overlap,
                        overlap_second=second_overlap(name, cfg, a.second))
        rows[row] = {"seconds": time.perf_counter() - t0, "load_avg_start": load0, "load_avg_end": os.getloadavg()[0],
                     "size_bytes": model_size_bytes(path), **info}
        log.info("%s %s: %.0f s", name, row, rows[row]["seconds"])
    res["eval"] = evaluate(name, work, a)
    return res


def second_overlap(name: str, cfg: QATConfig, corpus: str) -> dict[str, Any]:
    """The job's training windows (same corpus, seed, shape) against the second evaluation corpus."""
    from lowbit.eval import tokenize_corpus
    from lowbit.jobs.evaluate import eval_text
    from lowbit.qat.data import check_disjoint, overlap

    tok = load_model(name).tokenizer
    tokens = calibration_tokens(tok, resolve_calib_texts(cfg.corpus or "c4"), cfg.samples, cfg.seq_len,
                                seed=cfg.train.seed)
    label, text = eval_text(corpus)
    ov = overlap(tokens, tokenize_corpus(tok, text), cfg.corpus or "c4", label)
    check_disjoint(ov, cfg.max_overlap)
    return ov.to_dict()


def protect(name: str, base: Recipe, scheme: QuantScheme, max_gs: int, a: argparse.Namespace
            ) -> tuple[Recipe, dict[str, Any]]:
    lm = load_model(name)
    tokens = calibration_tokens(lm.tokenizer, resolve_calib_texts("c4"), 4, 256, seed=7)
    t0 = time.perf_counter()
    scores = sensitivity(lm.model, tokens, scheme)
    recipe, info = protected_recipe(lm.model, base, scores, max_gs)
    info["sensitivity_seconds"] = time.perf_counter() - t0
    info["worst"] = [[list(g), v] for g, v in sorted(scores.items(), key=lambda kv: -kv[1])[:8]]
    log.info("protected: %s (%.3f bits/weight against %.3f)", info["kept"], info["bits_per_weight"],
             info["base_bits_per_weight"])
    return recipe, info


def evaluate(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    ref, tok = load(name)
    models = {"reference": ref}
    for row in a.rows:
        models[row], _ = load(work / row)
    out = {}
    for corpus in ("wikitext2", a.second):
        label, res = evaluate_models(models, tok, reference="reference", data=corpus, ctx=2048,
                                     max_windows=a.windows)
        out[label] = {k: v.to_dict() for k, v in res.items()}
    return out


def recovered(ev: dict[str, Any], ptq: str, qat: str) -> float | None:
    if ptq not in ev or qat not in ev:
        return None
    r, q, t = ev["reference"]["ppl"], ev[ptq]["ppl"], ev[qat]["ppl"]
    return (q - t) / (q - r)


def show(out: dict[str, Any]) -> None:
    c = Console()
    for name, res in out["models"].items():
        for corpus, ev in res["eval"].items():
            t = Table(title=f"{name} {res['scheme']}: {corpus}, {ev['reference']['n_windows']} windows of 2048")
            for col in ("row", "ppl", "Δppl", "KLD", "recovered", "size MB", "seconds"):
                t.add_column(col, justify="left" if col == "row" else "right")
            for row, e in ev.items():
                info = res["rows"].get(row, {})
                rec = recovered(ev, row.split("+")[0], row) if "+qat" in row else None
                t.add_row(row, f"{e['ppl']:.3f}", f"{e['ppl'] - ev['reference']['ppl']:+.3f}",
                          "-" if e["kld_mean"] is None else f"{e['kld_mean']:.4f}",
                          "-" if rec is None else f"{100 * rec:.1f}%",
                          f"{info['size_bytes'] / 1e6:.1f}" if info else "-",
                          f"{info['seconds']:.0f}" if info else "-")
            c.print(t)


if __name__ == "__main__":
    main()
