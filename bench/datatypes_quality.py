"""Perplexity and KLD of the data-type schemes next to RTN and to bitsandbytes' own models.

    python bench/datatypes_quality.py --models gemma3-270m qwen2.5-coder-0.5b --windows 2

For each model (the offline sources, bf16): quantize with lowbit to NF4, NF4+double-quant, FP4,
LLM.int8 (C4 calibration for the outlier columns), FP8 weight-only, FP8 W8A8 (dynamic per-token
activations) and RTN W4A16 g64 / W8A16; write each artifact, load it back from disk with lowbit's
runtime. Then let transformers + bitsandbytes quantize the same bf16 checkpoint (NF4, NF4+DQ,
FP4, LLM.int8). Every model runs in bf16 (transformers runs bitsandbytes models in bf16 whatever
is asked) on the same WikiText-2 windows (GPTQ protocol), against the bf16 reference.

bitsandbytes' 4-bit models run their dequantize + matmul path (``support_avx512bf16_for_cpu =
False``), the numerics lowbit reproduces: lowbit's NF4/NF4+DQ/FP4 rows must equal them exactly.
NF4 also appears with bitsandbytes' default CPU path (on AVX512-BF16 CPUs a fused kernel with
bf16 dot products, so slightly different numbers).
On a CPU the FP8 W8A8 GEMM is emulated (float8 operands, fp32 GEMM); bitsandbytes' LLM.int8
uses int8 GEMMs on CPU (``torch._int_mm``), as lowbit's runtime does.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from lowbit.core.dtypes import get_dt_scheme  # noqa: E402
from lowbit.core.io import write_json_atomic  # noqa: E402
from lowbit.core.scheme import get_scheme  # noqa: E402
from lowbit.jobs import evaluate_models, load_artifact, quantize  # noqa: E402
from lowbit.models.sources import ensure_source  # noqa: E402
from lowbit.pipeline.engine import Engine  # noqa: E402
from lowbit.recipe import Calibration, Recipe  # noqa: E402

LOWBIT = {
    "lowbit NF4": lambda: get_dt_scheme("NF4"),
    "lowbit NF4+DQ": lambda: get_dt_scheme("NF4", double_quant=True),
    "lowbit FP4": lambda: get_dt_scheme("FP4"),
    "lowbit LLM.int8": lambda: get_dt_scheme("INT8-LLM"),
    "lowbit FP8 weight-only": lambda: get_dt_scheme("FP8"),
    "lowbit FP8 W8A8 dyn (emulated GEMM)": lambda: get_dt_scheme("FP8_DYNAMIC"),
    "lowbit W4A16 g64 RTN": lambda: get_scheme("W4A16", group_size=64),
    "lowbit W8A16 RTN": lambda: get_scheme("W8A16"),
}


def bnb_models(src: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def load(**kw: Any) -> Any:
        cfg = BitsAndBytesConfig(**kw)
        return AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.bfloat16).eval()

    def dequant_path(model: Any) -> Any:
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        return model

    nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return {
        "bnb NF4 (default CPU kernel)": load(**nf4),
        "bnb NF4": dequant_path(load(**nf4)),
        "bnb NF4+DQ": dequant_path(load(**nf4, bnb_4bit_use_double_quant=True)),
        "bnb FP4": dequant_path(load(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                     bnb_4bit_compute_dtype=torch.bfloat16)),
        "bnb LLM.int8": load(load_in_8bit=True),
    }


def run_model(name: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = ensure_source(name)
    tok = AutoTokenizer.from_pretrained(src)
    models: dict[str, Any] = {"reference": AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()}
    meta: dict[str, Any] = {}
    for label, make in LOWBIT.items():
        scheme = make()
        res = quantize(str(src), Recipe(scheme, calibration=Calibration(a.calib, a.calib_samples, a.calib_len)),
                       work / f"{name}-{label.split()[1]}-{len(meta)}", engine=Engine(progress=False), force=True)
        m = load_artifact(res.path, dtype=torch.bfloat16)
        for mod in m.modules():
            if hasattr(mod, "cache"):
                mod.cache = False  # keep memory near the packed size; dequantize per forward
        models[label] = m
        meta[label] = {"bits_per_weight": res.bits_per_weight, "size_mb": res.size_bytes / 1e6,
                       "quantize_seconds": res.seconds, "scheme": scheme.label}
        logging.warning("%s %s: %.3f bits/w, %.1f s", name, label, res.bits_per_weight, res.seconds)
    models.update(bnb_models(src))
    corpus, res = evaluate_models(models, tok, reference="reference", data=None, protocol="gptq", ctx=a.ctx,
                                  max_windows=a.windows, progress=False)
    return {"corpus": corpus, "results": {k: {**v.to_dict(), **meta.get(k, {})} for k, v in res.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--calib", default=None, help="LLM.int8 calibration (default: c4 if found)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--out", default="bench/results/datatypes_quality.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16", per call
    t0 = time.perf_counter()
    report: dict[str, Any] = {"windows": a.windows, "ctx": a.ctx, "protocol": "gptq", "compute": "bfloat16",
                              "machine": f"{platform.processor() or platform.machine()}, "
                                         f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            report["models"][name] = run_model(name, a, Path(tmp))
    report["seconds"] = time.perf_counter() - t0
    table = Table(title=f"WikiText-2, GPTQ protocol, {a.windows} x {a.ctx} tokens, bf16 compute")
    for c in ("model", "config", "ppl", "d ppl", "KLD", "top-1", "bits/w"):
        table.add_column(c, justify="left" if c in ("model", "config") else "right")
    for name, rep in report["models"].items():
        ref = rep["results"]["reference"]["ppl"]
        for label, r in rep["results"].items():
            kld = "-" if r["kld_mean"] is None else f"{r['kld_mean']:.5f}"
            top = "-" if r["top1"] is None else f"{r['top1']:.4f}"
            bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "-"
            table.add_row(name, label, f"{r['ppl']:.4f}", f"{r['ppl'] - ref:+.4f}", kld, top, bpw)
    Console(width=160).print(table)
    write_json_atomic(a.out, report)
    print(f"wrote {a.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
