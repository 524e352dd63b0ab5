"""Where a block forward of the calibration engine spends its time: host overhead vs GPU work.

One Llama-3-8B-shaped decoder block (bf16, random weights) on the GPU, fed the engine's own
captured inputs (``capture_inputs``, offloaded to pinned host memory as in a real run) through
``BlockContext.forward_all``. For each scaled-dot-product-attention backend choice and each
forward kind (the whole block; the attention half, stopped at ``o_proj``'s input as a statistics
run stops) it reports milliseconds per calibration sample (1 x T tokens) against the matmul
floor (FLOPs over the measured bf16 rate). A run whose wall time lies far above its floor while
the GPU's own time is near it is host bound: the Python and launch overhead of the forward, not
the arithmetic.

Measured on an H200 (torch 2.11, 32 x 2048 tokens; ``bench/results/block_forward_h200.json``): the
whole block 1.80 ms a sample with torch's backend choice (cuDNN) against a 1.17 ms matmul floor,
flash attention 1.96 ms; the attention half 0.68 ms against 0.17 ms with either. The gap is the
eager block's memory-bound elementwise work (fp32 RMSNorm, rotary embedding, layouts), which
no backend choice removes; a profile's ~0.7 ms of host time per cuDNN call did not show here.
``--compile`` (``bench/results/block_forward_h200_compile.json``, another H200 host): torch.compile
of the block runs the whole block in 1.33 ms (eager 1.79 ms, 1.13x the floor; 5.7 s to compile),
but the attention half, whose hook stops the forward, takes 1.49 ms compiled against 0.82 ms eager.

    python bench/block_forward.py [--samples 32 --seq 2048] [--resident] [--compile] [--out DIR]

Writes ``block_forward.json`` under ``--out`` (default ``$OUT`` or bench/results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_speed import bf16_matmul_rate, build_model, llama3_8b_config, random_tokens  # noqa: E402


def _backends(name: str) -> contextlib.AbstractContextManager[Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "torch-default":
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, name)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", default="torch-default,CUDNN_ATTENTION,FLASH_ATTENTION")
    p.add_argument("--resident", action="store_true", help="also time the forwards on inputs already on the GPU")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(block) (implies --resident)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    from lowbit.models.archs import block_linears, get_arch, get_blocks
    from lowbit.pipeline.blockwise import BlockContext, _StopBlock, capture_inputs

    dev = torch.device("cuda")
    cfg = llama3_8b_config(1, tiny=False)
    model = build_model(cfg, dev)
    spec = get_arch(model)
    tokens = random_tokens(a.samples, a.seq, cfg.vocab_size)
    with torch.no_grad():
        hidden, kwargs = capture_inputs(model, tokens, spec, dev, offload=True)
    block = get_blocks(model, spec)[0].to(dev)
    lins = block_linears(block, spec, 0)
    ctx = BlockContext(0, block, lins, spec, dev, hidden, kwargs[0])

    # matmul rate and per-sample FLOPs (linears; causal attention 2 matmuls over half the pairs)
    rate = bf16_matmul_rate(dev)
    h, i, t = cfg.hidden_size, cfg.intermediate_size, a.seq
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    attn_lin = 2 * t * h * (h + 2 * kv)  # q/k/v
    sdpa = 2 * 2 * t * t * h / 2
    full = attn_lin + sdpa + 2 * t * h * h + 2 * t * 3 * h * i
    floors = {"attention half": (attn_lin + sdpa) / rate, "whole block": full / rate}

    def stop_at_o(m: Any, args: Any) -> None:
        raise _StopBlock

    rows: list[dict[str, Any]] = []

    def measure(kind: str, label: str, be: str, inputs: list[torch.Tensor]) -> None:
        handle = lins["self_attn.o_proj"].register_forward_pre_hook(stop_at_o) if kind != "whole block" else None
        try:
            with torch.inference_mode(), _backends(be):
                t0 = time.perf_counter()
                ctx.forward_all(inputs[:2], keep_outputs=False)  # warm-up (graphs, autotuning, compilation)
                torch.cuda.synchronize()
                warm = time.perf_counter() - t0
                best = float("inf")
                for _ in range(a.reps):
                    t0 = time.perf_counter()
                    ctx.forward_all(inputs, keep_outputs=False)
                    torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 -- a backend or compile mode that cannot run this: recorded
            rows.append({"kind": kind, "backend": label, "error": str(e).splitlines()[0][:300]})
            print(f"{kind:15s} {label:28s} error: {str(e).splitlines()[0][:200]}", flush=True)
            return
        finally:
            if handle is not None:
                handle.remove()
        ms = best / a.samples * 1e3
        fl = floors[kind] * 1e3
        rows.append({"kind": kind, "backend": label, "ms_per_sample": ms, "floor_ms": fl, "ratio": ms / fl,
                     "warmup_s": warm})
        print(f"{kind:15s} {label:28s} {ms:8.3f} ms/sample  floor {fl:6.3f}  x{ms / fl:5.2f}  (warm-up {warm:.1f} s)",
              flush=True)

    for kind in ("whole block", "attention half"):
        for be in a.backends.split(","):
            measure(kind, be, be, hidden)
    if a.resident or a.compile:  # the same forwards on inputs already on the GPU: no uploads
        resident = [h.to(dev) for h in hidden]
        for kind in ("whole block", "attention half"):
            measure(kind, "torch-default, inputs on GPU", "torch-default", resident)
        if a.compile:  # torch.compile of the block: the elementwise work fused
            ctx.block = torch.compile(block, dynamic=False)
            for kind in ("whole block", "attention half"):
                measure(kind, "torch.compile, inputs on GPU", "torch-default", resident)
                measure(kind, "torch.compile, offloaded", "torch-default", hidden)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "samples": a.samples,
           "seq": a.seq, "bf16_rate": rate, "rows": rows}
    (out / "block_forward.json").write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
