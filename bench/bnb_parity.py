"""NF4/FP4 parity with bitsandbytes on every linear of real models: codes, absmax, packed bytes.

    python bench/bnb_parity.py --models smollm2-135m gemma3-270m qwen2.5-coder-0.5b

For each decoder linear of each model (the offline sources' bf16 weights), quantize with
``bitsandbytes.functional.quantize_4bit`` and with lowbit (NF4 and FP4, with and without double
quantization, block 64) and count the tensors whose bytes differ; also time both. Prints one table
and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowbit.core.dtypes import DataTypeScheme  # noqa: E402
from lowbit.core.io import write_json_atomic  # noqa: E402
from lowbit.methods.nf4 import quantize_4bit  # noqa: E402
from lowbit.models.archs import get_arch  # noqa: E402
from lowbit.models.sources import ensure_source  # noqa: E402
from lowbit.pipeline.quantize import named_linears  # noqa: E402


def compare(w: torch.Tensor, kind: str, dq: bool, block: int) -> tuple[bool, float, float]:
    import bitsandbytes.functional as bnbf

    t0 = time.perf_counter()
    packed, st = bnbf.quantize_4bit(w, blocksize=block, compress_statistics=dq, quant_type=kind)
    t1 = time.perf_counter()
    qw = quantize_4bit(w, DataTypeScheme(kind, block, dq))
    t2 = time.perf_counter()
    same = torch.equal(qw.packed(), packed)
    if dq:
        same &= torch.equal(qw.qabsmax, st.absmax) and torch.equal(qw.absmax2, st.state2.absmax)
        same &= qw.offset.item() == st.offset.item()
    else:
        same &= torch.equal(qw.absmax, st.absmax)
    return same, t1 - t0, t2 - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--out", default="bench/results/bnb_parity.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM

    report: dict[str, Any] = {"block": a.block, "torch": torch.__version__, "models": {}}
    print(f"{'model':22} {'type':8} {'tensors':>8} {'identical':>10} {'weights':>12} {'bnb s':>8} {'lowbit s':>9}")
    for name in a.models:
        model = AutoModelForCausalLM.from_pretrained(ensure_source(name), dtype=torch.bfloat16)
        lins = named_linears(model, get_arch(model))
        for kind in ("nf4", "fp4"):
            for dq in (False, True):
                same = 0
                tb = tl = 0.0
                bad: list[str] = []
                for lname, lin in lins:
                    ok, b, lo = compare(lin.weight.data, kind, dq, a.block)
                    same += ok
                    tb, tl = tb + b, tl + lo
                    if not ok:
                        bad.append(lname)
                label = f"{kind}{'+dq' if dq else ''}"
                n_w = sum(lin.weight.numel() for _, lin in lins)
                report["models"].setdefault(name, {})[label] = {
                    "tensors": len(lins), "identical": same, "weights": n_w, "mismatched": bad[:10],
                    "bnb_seconds": tb, "lowbit_seconds": tl}
                print(f"{name:22} {label:8} {len(lins):8d} {same:10d} {n_w:12d} {tb:8.2f} {tl:9.2f}")
    write_json_atomic(a.out, report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
