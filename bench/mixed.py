"""Mixed precision against the fixed mixes and the uniform schemes, side by side, on real models.

    python bench/mixed.py --models gemma3-270m qwen2.5-coder-0.5b --parts sens gguf ct

``sens``: the fast sensitivity estimate (timed) and the measured KLD of the model with one tensor alone
quantized, for the GGUF family (``--sens-candidates``, default Q4_0, which fits every tensor of both models)
and the integer family by GPTQ (``--ct-sens-candidates``, default W3), on the tensors of every
``--sens-stride``-th block plus the embedding; Spearman of estimate against measurement; a plot per model.

``gguf``: one importance matrix (lowbit's, C4), llama.cpp's Q4_K_M and Q3_K_M with it, and lowbit's per-tensor
mixes at exactly their file bits per weight (the allocation counts every tensor byte and the metadata, so the
mix is never larger), all evaluated *in llama.cpp* against the float model on the same WikiText-2 windows
(llama.cpp's perplexity protocol: 512-token windows, second halves scored, BOS first).

``ct``: GPTQ (plain, ``--gptq-alpha``, same calibration tokens for all) with every uniform scheme W3/W4 x group
32/64/128 x sym/asym (and W8 g128), and the mixes at ``--budgets`` bits per weight of the quantized linears,
written as compressed-tensors artifacts by ``lowbit.quantize`` and evaluated from disk against the float model
on the same windows (GPTQ protocol, ``--ctx``).

Every part writes ``bench/results/mixed/<part>_<model>.json``; artifacts go to ``--work`` and are reused by a
later run (delete them to redo). Timings are wall-clock on this machine with whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowbit.core.io import write_json_atomic  # noqa: E402

log = logging.getLogger("bench.mixed")
UNIFORM = [f"W{b}g{g}{a}" for b in (3, 4) for g in (128, 64, 32) for a in ("", "a")] + ["W8g128"]
CT_CANDIDATES = ("W2g64", "W3g128", "W3g128a", "W3g64", "W3g32", "W3g32a", "W4g128", "W4g128a", "W4g64", "W4g32",
                 "W4g32a", "W8g128")


def machine() -> dict[str, Any]:
    import os

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg()}


def gptq_config(a: argparse.Namespace) -> Any:
    from lowbit.methods.gptq import GPTQConfig

    return GPTQConfig(asym_alpha=a.gptq_alpha, true_sequential=not a.no_true_sequential)


def sens_part(name: str, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    from lowbit.mixed import SensitivityConfig, sensitivity
    from lowbit.mixed.plot import plot_costs

    res: dict[str, Any] = {}
    stride = f"(?:{'|'.join(str(i) for i in range(0, 64, a.sens_stride))})"
    todo = {"gguf": (None, a.sens_candidates, rf"^(token_embd|output)\.|^blk\.{stride}\."),
            "int": (CT_CANDIDATES, a.ct_sens_candidates, rf"^model\.layers\.{stride}\.")}
    for family in a.sens_families:
        cands, meas, pattern = todo[family]
        cfg = SensitivityConfig(family=family, candidates=cands, method="gptq" if family == "int" else "rtn",
                                samples=a.sens_samples, length=512, gptq=gptq_config(a))
        t0 = time.perf_counter()
        s = sensitivity(name, cfg, measure_windows=a.sens_windows, measure_candidates=meas.split(","),
                        measure_tensors=pattern, progress=False, device=a.device)
        path = out / f"sens_{family}_{Path(name).name}.json"
        s.save(path)
        plot_costs(s, out / f"sens_{family}_{Path(name).name}.png")
        d = s.to_dict()
        res[family] = {"file": path.name, "seconds": s.meta["seconds"], "rank_agreement": d["rank_agreement"],
                       "wall": time.perf_counter() - t0}
        log.warning("%s %s: %s", name, family, json.dumps(res[family]))
    return res


def _gguf_eval(name: str, files: dict[str, Path], a: argparse.Namespace) -> dict[str, Any]:
    from lowbit.eval.llamacpp import LlamaCppLogits
    from lowbit.jobs.evaluate import evaluate_models
    from lowbit.models.loader import load_model

    lm = load_model(name, dtype=torch.float32)
    models: dict[str, Any] = {"reference": lm.model}
    for k, p in files.items():
        models[k] = LlamaCppLogits(p, 512)
    corpus, res = evaluate_models(models, lm.tokenizer, reference="reference", data=None, protocol="llamacpp",
                                  ctx=512, max_windows=a.gguf_windows, progress=False)
    return {"corpus": corpus, "results": {k: v.to_dict() for k, v in res.items()}}


def gguf_part(name: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    from lowbit.formats.gguf.imatrix import load_imatrix
    from lowbit.jobs.gguf import compute_imatrix, export_gguf
    from lowbit.mixed import Budget, SensitivityConfig, allocate_from, sensitivity
    from lowbit.mixed.api import gguf_overhead
    from lowbit.models.sources import ensure_source

    work.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"seconds": {}}
    im_path = work / "imatrix.gguf"
    if not im_path.exists():
        t0 = time.perf_counter()
        compute_imatrix(name, im_path, calib="c4", samples=a.imatrix_samples, length=512, progress=False)
        meta["seconds"]["imatrix"] = time.perf_counter() - t0
    im = load_imatrix(im_path)
    files: dict[str, Path] = {}
    info: dict[str, Any] = {}
    for ft in ("Q4_K_M", "Q3_K_M"):
        p = work / f"stock-{ft}.gguf"
        if not p.exists():
            export_gguf(name, p, ft, imatrix=im_path)
        files[f"llama.cpp {ft}"] = p
    sens_path = work / "sens_gguf.json"
    if sens_path.exists():
        from lowbit.mixed import Sensitivity

        sens = Sensitivity.load(sens_path)
    else:
        cfg = SensitivityConfig(family="gguf", samples=a.sens_samples, length=512)
        sens = sensitivity(name, cfg, imatrix=im, progress=False)
        sens.save(sens_path)
    meta["sensitivity_seconds"] = sens.meta["seconds"]
    overhead = gguf_overhead(ensure_source(name))
    for ft in ("Q4_K_M", "Q3_K_M"):
        stock = files[f"llama.cpp {ft}"]
        n = _gguf_values(stock)
        bpw = 8 * stock.stat().st_size / n
        alloc = allocate_from(sens, Budget(bpw=bpw), overhead)
        p = work / f"mix-at-{ft}.gguf"
        if not p.exists():
            export_gguf(name, p, None, imatrix=im_path, types=alloc.gguf_types())
        files[f"lowbit mix @ {ft} size"] = p
        info[f"lowbit mix @ {ft} size"] = {"predicted_kld": alloc.predicted, "counts": alloc.counts(),
                                           "types": alloc.gguf_types()}
    for k, p in files.items():
        info.setdefault(k, {}).update(size_bytes=p.stat().st_size,
                                      bits_per_weight=8 * p.stat().st_size / _gguf_values(p))
    ev = _gguf_eval(name, files, a)
    for k, r in ev["results"].items():
        r.update(info.get(k, {}))
    return {**ev, "meta": meta, "windows": a.gguf_windows}


def _gguf_values(path: Path) -> int:
    import gguf
    import numpy as np

    return sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(path).tensors)


def ct_part(name: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    from lowbit.jobs import evaluate_models, load_artifact, quantize
    from lowbit.mixed import Budget, Sensitivity, SensitivityConfig, allocate_from, sensitivity
    from lowbit.mixed.candidates import parse_candidate
    from lowbit.models.loader import load_model
    from lowbit.pipeline.engine import Engine
    from lowbit.recipe import Calibration, Recipe

    work.mkdir(parents=True, exist_ok=True)
    gcfg = gptq_config(a)
    cal = Calibration("c4", a.calib_samples, 512, 0)
    sens_path = Path(a.out) / f"sens_int_{Path(name).name}.json"  # the sens part's, if it ran (same configuration)
    if sens_path.exists():
        sens = Sensitivity.load(sens_path)
    else:
        cfg = SensitivityConfig(family="int", method="gptq", candidates=CT_CANDIDATES, samples=a.sens_samples,
                                length=512, gptq=gcfg)
        sens = sensitivity(name, cfg, progress=False, device=a.device)
        sens.save(sens_path)
    recipes: dict[str, tuple[Recipe, dict[str, Any]]] = {}
    for u in UNIFORM:
        c = parse_candidate(u, "int")
        assert c.scheme is not None
        bpw = 8 * sum(c.nbytes(t.shape) for t in sens.tensors) / sum(t.numel for t in sens.tensors)
        recipes[f"uniform {u}"] = (Recipe(c.scheme, gcfg, cal), {"bits_per_weight": bpw})
    for b in a.budgets:
        alloc = allocate_from(sens, Budget(bpw=b))
        recipes[f"lowbit mix @ {b:g}"] = (alloc.recipe(Recipe(alloc.recipe().scheme, gcfg, cal)),
                                          {"bits_per_weight": alloc.bits_per_weight, "predicted_kld": alloc.predicted,
                                           "counts": alloc.counts()})
    lm = load_model(name, dtype=torch.float32)
    models: dict[str, Any] = {"reference": lm.model.to(a.device)}
    info: dict[str, Any] = {}
    for label, (recipe, extra) in recipes.items():
        path = work / label.replace(" ", "_").replace("@", "at")
        t0 = time.perf_counter()
        if not (path / "recipe.yaml").exists():
            quantize(name, recipe, path, engine=Engine(device=a.device, progress=False), force=True)
        m = load_artifact(path, dtype=torch.float32).to(a.device)
        models[label] = m
        info[label] = {**extra, "quantize_seconds": time.perf_counter() - t0}
        log.warning("%s %s: %s", name, label, info[label])
    corpus, res = evaluate_models(models, lm.tokenizer, reference="reference", data=None, protocol="gptq",
                                  ctx=a.ctx, max_windows=a.ct_windows, progress=False)
    out = {k: {**v.to_dict(), **info.get(k, {})} for k, v in res.items()}
    return {"corpus": corpus, "results": out, "gptq": {"asym_alpha": a.gptq_alpha,
                                                       "true_sequential": not a.no_true_sequential},
            "calibration": {"samples": a.calib_samples, "length": 512}, "ctx": a.ctx, "windows": a.ct_windows,
            "sensitivity_seconds": sens.meta["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--parts", nargs="+", default=["sens", "gguf", "ct"], choices=["sens", "gguf", "ct"])
    p.add_argument("--out", default="bench/results/mixed")
    p.add_argument("--device", default="cpu", help="where sensitivity, GPTQ and the ct evaluation run")
    p.add_argument("--sens-families", nargs="+", default=["gguf", "int"], choices=["gguf", "int"])
    p.add_argument("--work", default="/tmp/lowbit-mixed-bench")
    p.add_argument("--sens-samples", type=int, default=8, help="Fisher calibration sequences (x 512 tokens)")
    p.add_argument("--sens-windows", type=int, default=2, help="512-token windows of the single-tensor KLD")
    p.add_argument("--sens-stride", type=int, default=3, help="measure the tensors of every N-th block")
    p.add_argument("--sens-candidates", default="Q4_0")
    p.add_argument("--ct-sens-candidates", default="W3g128")
    p.add_argument("--imatrix-samples", type=int, default=64)
    p.add_argument("--gguf-windows", type=int, default=24)
    p.add_argument("--calib-samples", type=int, default=16, help="GPTQ calibration sequences (x 512 tokens)")
    p.add_argument("--gptq-alpha", type=float, default=0.5, help="GPTAQ strength (0: plain GPTQ; 0.5 default)")
    p.add_argument("--no-true-sequential", action="store_true")
    p.add_argument("--budgets", type=float, nargs="+", default=[3.5, 4.5, 5.5])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--ct-windows", type=int, default=12)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in a.models:
        for part in a.parts:
            t0 = time.perf_counter()
            if part == "sens":
                res = sens_part(name, a, out)
            elif part == "gguf":
                res = gguf_part(name, a, Path(a.work) / Path(name).name / "gguf")
            else:
                res = ct_part(name, a, Path(a.work) / Path(name).name / "ct")
            res.update(model=name, part=part, seconds=time.perf_counter() - t0, machine=machine(),
                       args={k: v for k, v in vars(a).items() if k not in ("models", "parts")})
            write_json_atomic(out / f"{part}_{Path(name).name}.json", res)
            _print(part, name, res)


def _print(part: str, name: str, res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    if part == "sens":
        for fam, r in res.items():
            if isinstance(r, dict) and "rank_agreement" in r:
                print(f"{name} {fam}: Spearman {json.dumps(r['rank_agreement'])}, seconds {r['seconds']}")
        return
    t = Table(title=f"{name} {part}: {res['corpus']}")
    for c in ("config", "bits/w", "KLD", "top-1", "ppl"):
        t.add_column(c, justify="left" if c == "config" else "right")
    for k, r in res["results"].items():
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "-"
        kld = "-" if r.get("kld_mean") is None else f"{r['kld_mean']:.5f}"
        top = "-" if r.get("top1") is None else f"{r['top1']:.4f}"
        t.add_row(k, bpw, kld, top, f"{r['ppl']:.3f}")
    Console(width=160).print(t)


if __name__ == "__main__":
    main()
