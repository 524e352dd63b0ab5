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

``ct``: every uniform scheme W3/W4 x group 32/64/128 x sym/asym (and W8 g128) and the mixes at ``--budgets``
bits per weight of the quantized linears, all assembled from the same GPTQ solves (the integer sensitivity
pass quantizes each linear by GPTQ from the float model's ``X^T X`` for every candidate: the layers of each
configuration are those solves), written by the compressed-tensors writer and evaluated from disk against the
float model on the same windows (GPTQ protocol, ``--ctx``). Not lowbit's sequential GPTQ (each block's
Hessian from the quantized blocks before it): on this CPU that costs about an hour a run for the 0.5B model.

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
CT_CANDIDATES = ("W2g64", *UNIFORM)


def machine() -> dict[str, Any]:
    import os

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg()}


def gptq_config(a: argparse.Namespace) -> Any:
    from lowbit.methods.gptq import GPTQConfig

    return GPTQConfig()  # the library's defaults (its asymmetric term needs quantized inputs: none here)


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
                                samples=a.sens_samples, length=512, gptq=gptq_config(a),
                                gptq_samples=a.gptq_samples if family == "int" else None)
        t0 = time.perf_counter()
        work = Path(a.work) / Path(name).name / "ct"
        store = QWStore(work / "qw") if family == "int" else None
        s = sensitivity(name, cfg, measure_windows=a.sens_windows, measure_candidates=meas.split(","),
                        measure_tensors=pattern, progress=False, device=a.device,
                        sink=store.put if store is not None else None)
        if store is not None:
            (work / "qw.done").write_text("ok")
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


class QWStore:
    """Each GPTQ result of the integer sensitivity pass on disk: ``root/<candidate>/<tensor>.pt``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, tensor: str, cand: str) -> Path:
        return self.root / cand / f"{tensor}.pt"

    def put(self, tensor: str, cand: str, qw: Any) -> None:
        p = self.path(tensor, cand)
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"codes": qw.codes.cpu(), "scales": qw.scales.cpu(), "zeros": qw.zeros.cpu()}, p)

    def get(self, tensor: str, cand: str, scheme: Any) -> Any:
        from lowbit.core.qweight import QuantizedWeight

        d = torch.load(self.path(tensor, cand))
        return QuantizedWeight(d["codes"], d["scales"], d["zeros"], scheme)


def ct_part(name: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every configuration's layers come from the sensitivity pass's own GPTQ results (each linear quantized by
    GPTQ from the float model's X^T X, per candidate): the uniform schemes and the mixes are assembled from the
    same solves, written by the compressed-tensors writer and evaluated from disk."""
    from lowbit.formats.compressed_tensors import save_quantized
    from lowbit.jobs import evaluate_models, load_artifact
    from lowbit.mixed import Budget, Sensitivity, SensitivityConfig, allocate_from, sensitivity
    from lowbit.mixed.candidates import parse_candidate
    from lowbit.models.loader import load_model

    work.mkdir(parents=True, exist_ok=True)
    store = QWStore(work / "qw")
    sens_path = Path(a.out) / f"sens_int_{Path(name).name}.json"
    if sens_path.exists() and (work / "qw.done").exists():
        sens = Sensitivity.load(sens_path)
    else:
        cfg = SensitivityConfig(family="int", method="gptq", candidates=CT_CANDIDATES, samples=a.sens_samples,
                                length=512, gptq=gptq_config(a), gptq_samples=a.gptq_samples)
        sens = sensitivity(name, cfg, progress=False, device=a.device, sink=store.put)
        sens.save(sens_path)
        (work / "qw.done").write_text("ok")
    configs: dict[str, tuple[dict[str, str], dict[str, Any]]] = {}
    for u in UNIFORM:
        c = parse_candidate(u, "int")
        choice = {t.name: c.name for t in sens.tensors}
        nbytes = sum(c.nbytes(t.shape) for t in sens.tensors)
        configs[f"uniform {u}"] = (choice, {"bits_per_weight": 8 * nbytes / sum(t.numel for t in sens.tensors),
                                           "predicted_kld": sum(sens.cost[t.name][c.name] for t in sens.tensors)})
    for b in a.budgets:
        alloc = allocate_from(sens, Budget(bpw=b))
        configs[f"lowbit mix @ {b:g}"] = (alloc.choice, {"bits_per_weight": alloc.bits_per_weight,
                                                         "predicted_kld": alloc.predicted, "counts": alloc.counts(),
                                                         "recipe": alloc.recipe().to_dict()})
    lm = load_model(name, dtype=torch.bfloat16)
    paths: dict[str, Path] = {}
    for label, (choice, _) in configs.items():
        path = work / label.replace(" ", "_").replace("@", "at")
        if not (path / "config.json").exists():
            qws = {t.module: store.get(t.name, choice[t.name], sens.candidate(choice[t.name]).scheme)
                   for t in sens.tensors}
            save_quantized(lm.model, qws, path, tokenizer=lm.tokenizer, dtype=torch.bfloat16, overwrite=True)
        paths[label] = path
    del lm
    ref = load_model(name, dtype=torch.float32)
    results: dict[str, Any] = {}
    corpus = ""
    labels = list(paths)
    for i in range(0, len(labels), a.eval_group):  # a few artifacts at a time: memory
        models: dict[str, Any] = {"reference": ref.model}
        for label in labels[i:i + a.eval_group]:
            m = load_artifact(paths[label], dtype=torch.float32)
            for mod in m.modules():
                if hasattr(mod, "cache"):
                    mod.cache = False
            models[label] = m
        corpus, res = evaluate_models(models, ref.tokenizer, reference="reference", data=None, protocol="gptq",
                                      ctx=a.ctx, max_windows=a.ct_windows, progress=False)
        results.update({k: v.to_dict() for k, v in res.items()})
        log.warning("%s ct: %s", name, {k: round(v.kld_mean or 0, 5) for k, v in res.items()})
    for label, (_, extra) in configs.items():
        results[label].update(extra)
    return {"corpus": corpus, "results": results, "ctx": a.ctx, "windows": a.ct_windows,
            "gptq": {"config": "GPTQConfig() defaults", "samples": a.gptq_samples, "length": 512,
                     "from": "float inputs, per layer (the sensitivity pass's solves)"},
            "sensitivity": {"samples": a.sens_samples, "length": 512, "seconds": sens.meta["seconds"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--parts", nargs="+", default=["sens", "gguf", "ct"], choices=["sens", "gguf", "ct"])
    p.add_argument("--out", default="bench/results/mixed")
    p.add_argument("--device", default="cpu", help="where sensitivity, GPTQ and the ct evaluation run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a CPU shared with other jobs one "
                   "thread ran GPTQ's column loop 10x faster than two: no OpenMP barriers to wait on)")
    p.add_argument("--sens-families", nargs="+", default=["gguf", "int"], choices=["gguf", "int"])
    p.add_argument("--work", default="/tmp/lowbit-mixed-bench")
    p.add_argument("--sens-samples", type=int, default=8, help="Fisher calibration sequences (x 512 tokens)")
    p.add_argument("--sens-windows", type=int, default=2, help="512-token windows of the single-tensor KLD")
    p.add_argument("--sens-stride", type=int, default=3, help="measure the tensors of every N-th block")
    p.add_argument("--sens-candidates", default="Q4_0")
    p.add_argument("--ct-sens-candidates", default="W3g128")
    p.add_argument("--imatrix-samples", type=int, default=64)
    p.add_argument("--gguf-windows", type=int, default=24)
    p.add_argument("--gptq-samples", type=int, default=32, help="GPTQ calibration sequences (x 512 tokens)")
    p.add_argument("--budgets", type=float, nargs="+", default=[3.5, 4.5, 5.5])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--ct-windows", type=int, default=12)
    p.add_argument("--eval-group", type=int, default=3, help="artifacts evaluated per pass over the windows")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
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
