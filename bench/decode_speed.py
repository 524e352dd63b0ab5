"""Decode speed and peak memory of a Llama-3-8B-shaped model with random weights, one config at a time.

    python bench/decode_speed.py --out OUT/decode.json                 # GPU: bf16 w8a16 w4a16 fp8 nf4
    python bench/decode_speed.py --tiny --device cpu --configs bf16 w4a16   # smoke test

Batch 1, a ``--prompt`` token random prompt (prefill, eager), then ``--new`` greedy tokens through
``static_decode.StaticDecoder`` (static KV cache), each decode step replayed from one CUDA graph.
Configs (every decoder linear; embeddings, norms and ``lm_head`` stay bf16):

* ``bf16``   ``nn.Linear`` (cuBLAS);
* ``w8a16``  lowbit W8A16 (8-bit per channel, symmetric) ``QuantLinear`` -> ``prepare_model`` -> Triton;
* ``w4a16``  lowbit W4A16 (4-bit, group 128, symmetric), likewise;
* ``fp8``    lowbit ``FP8Linear`` FP8_DYNAMIC (E4M3 per-channel weights, dynamic per-token activations,
             ``torch._scaled_mm``);
* ``nf4``    bitsandbytes ``Linear4bit`` (NF4, blocks of 64, bf16 compute), when bitsandbytes imports.

Weights are drawn at random on the device directly in each format (codes, scales), never as a bf16
model first, so ``weights_gib`` is the model as loaded. ``peak_gib`` is ``torch.cuda.max_memory_allocated``
from the start of prefill to the end of decoding (weights, KV cache, activations, graph pool).
Tuned Triton configurations come from ``--tuned`` (written by ``bench/kernels_speed.py``) or are
tuned here before capture.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT / "src", _ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gptq_speed import llama3_8b_config  # noqa: E402
from static_decode import decode_tokens_per_s  # noqa: E402

CONFIGS = ("bf16", "w8a16", "w4a16", "fp8", "nf4")


def make_linear(kind: str, k: int, n: int, dev: torch.device) -> nn.Module:
    """One random decoder linear ``(n, k)`` of ``kind`` on ``dev``."""
    from lowbit.core.packing import packed_words
    from lowbit.core.qlinear import QuantLinear
    from lowbit.core.scheme import QuantScheme

    if kind == "bf16":
        lin = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        nn.init.normal_(lin.weight, 0.0, 0.02)
        return lin.requires_grad_(False)
    if kind in ("w8a16", "w4a16"):
        scheme = QuantScheme(8, None) if kind == "w8a16" else QuantScheme(4, 128)
        with torch.device(dev):
            q = QuantLinear(k, n, scheme, dtype=torch.bfloat16)
        # random int32 words are uniformly random codes in the compressed-tensors layout
        q.weight_packed = torch.randint(-2**31, 2**31 - 1, (n, packed_words(k, scheme.bits)), dtype=torch.int32,
                                        device=dev)
        q.weight_scale.uniform_(0.02 / 2 ** (scheme.bits - 1), 0.04 / 2 ** (scheme.bits - 1))
        return q
    if kind == "fp8":
        from lowbit.core.dtypes import DT_PRESETS
        from lowbit.core.fp8_linear import FP8Linear, FP8Weight

        w = (torch.randn(n, k, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = torch.full((n, 1), 0.02 / 64, device=dev, dtype=torch.bfloat16)
        return FP8Linear.from_weight(FP8Weight(w, s, DT_PRESETS["FP8_DYNAMIC"]))
    if kind == "nf4":
        import bitsandbytes as bnb

        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device=dev)
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, quant_type="nf4",
                                       blocksize=64, bnb_quantized=True, module=lin)
        del w
        return lin
    raise ValueError(f"unknown config {kind!r}; choose from {CONFIGS}")


def build_model(cfg: Any, kind: str, dev: torch.device) -> nn.Module:
    """The model skeleton on ``meta``, each decoder linear made on ``dev`` as ``kind``, the rest random bf16."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    for name, mod in list(model.model.layers.named_modules()):
        if isinstance(mod, nn.Linear):
            parent, _, child = name.rpartition(".")
            model.model.layers.get_submodule(parent).register_module(
                child, make_linear(kind, mod.in_features, mod.out_features, dev))
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                t = torch.empty(p.shape, dtype=torch.bfloat16, device=dev)
                t.fill_(1.0) if "norm" in type(mod).__name__.lower() else t.normal_(0.0, 0.02)
                mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
    with torch.device(dev):  # its inv_freq buffer was made on meta
        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on meta: {left[:5]}")
    return model.eval()


def run_config(kind: str, cfg: Any, dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.core.kernels import configs as kcfg
    from lowbit.core.kernels import prepare_model, warm_up

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    model = build_model(cfg, kind, dev)
    row: dict[str, Any] = {"config": kind}
    if kind in ("w8a16", "w4a16"):
        report = prepare_model(model, dev)
        row["kernels"] = report.summary()
        if dev.type == "cuda":
            if args.tuned and Path(args.tuned).exists():
                kcfg.load(args.tuned)
            row["tuned"] = warm_up(model, rows=(1, args.prompt))  # what --tuned did not cover
    row["build_s"] = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        row["weights_gib"] = torch.cuda.memory_allocated(dev) / 2**30
        torch.cuda.reset_peak_memory_stats(dev)
    row.update(decode_tokens_per_s(model, args.prompt, args.new, graphs=not args.no_graphs, runs=args.runs))
    if dev.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    del model
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="small dims (CPU smoke test)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--tuned", help="JSON of tuned Triton configs (bench/kernels_speed.py --tuned-out)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results/kernels"), "decode_speed.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = llama3_8b_config(args.layers, args.tiny)
    info: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
                            "torch": torch.__version__, "layers": args.layers, "prompt": args.prompt, "new": args.new,
                            "argv": sys.argv}
    rows = []
    for kind in args.configs:
        try:
            rows.append(run_config(kind, cfg, dev, args))
        except Exception as e:  # one config failing (e.g. bitsandbytes without CUDA) must not lose the others
            rows.append({"config": kind, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        r = rows[-1]
        print(f"{kind:6s} " + (f"{r['tokens_per_s']:8.1f} tok/s  prefill {r['prefill_s'] * 1e3:7.1f} ms  "
                               f"weights {r.get('weights_gib', 0):6.2f} GiB  peak {r.get('peak_gib', 0):6.2f} GiB  "
                               f"{r['mode']}" if "error" not in r else r["error"]), flush=True)
    base = next((r["tokens_per_s"] for r in rows if r["config"] == "bf16" and "error" not in r), None)
    print(f"\n{'config':7s} {'tok/s':>8s} {'x bf16':>7s} {'weights GiB':>12s} {'peak GiB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:7s} failed: {r['error'][:100]}")
            continue
        ratio = f"{r['tokens_per_s'] / base:7.2f}" if base else "      -"
        print(f"{r['config']:7s} {r['tokens_per_s']:8.1f} {ratio} {r.get('weights_gib', 0):12.2f} "
              f"{r.get('peak_gib', 0):9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    if dev.type == "cuda":
        from lowbit.core.kernels import configs as kcfg

        kcfg.save(str(Path(args.out).with_name("tuned_decode.json")))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
