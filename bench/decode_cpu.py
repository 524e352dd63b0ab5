"""CPU batch-1 decode speed of real models: bf16 reference vs lowbit W4A16 / W8A16 artifacts vs llama.cpp Q4_0.

    python bench/decode_cpu.py                                  # SmolLM2-135M and Qwen2.5-Coder-0.5B, 2 threads
    python bench/decode_cpu.py --models smollm2-135m --new 64   # quicker

For each model: the bf16 reference (transformers ``nn.Linear``), its W4A16 (RTN, group 128, or 64 where
128 does not divide the hidden size) and W8A16 (per channel) artifacts written by lowbit and loaded back
from disk (``load_quantized``), then ``prepare_model(model, "cpu", dtype=bf16)``: the int4 / int8 CPU
kernels where they apply (the report says which); ``<w>-head8`` also runs the 16-bit ``lm_head`` as int8
(``prepare_model(int8_head=True)``, an approximation beyond the artifact), ``<w>-dequant`` the fallback.
All decode with ``static_decode.StaticDecoder`` (greedy, static KV cache, eager): a random ``--prompt``
token prompt, then ``--new`` tokens. Configurations alternate round by round (``--rounds``) so that
every one sees the same machine load; tokens/s is the median over rounds.

llama.cpp: the reference folder converted by lowbit to GGUF Q4_0 (``write_gguf``), run through
llama-cpp-python with the same thread count, the same prompt length and ``--new`` tokens (its own
timings: decode tokens / decode seconds), when ``llama_cpp`` imports.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT / "src", _ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from static_decode import decode_tokens_per_s  # noqa: E402


def artifacts(name: str, tmp: Path) -> tuple[Path, dict[str, Path], int]:
    """The reference folder and lowbit's W4A16 / W8A16 artifacts of ``name`` (RTN), written once."""
    from lowbit.core.scheme import QuantScheme
    from lowbit.formats import compressed_tensors as ct
    from lowbit.models.loader import load_model
    from lowbit.models.sources import ensure_source
    from lowbit.pipeline.quantize import quantize_model

    src = ensure_source(name)
    hidden = json.loads((src / "config.json").read_text())["hidden_size"]
    gs = 128 if hidden % 128 == 0 else 64
    out = {}
    for label, scheme in (("w4a16", QuantScheme(4, gs)), ("w8a16", QuantScheme(8, None))):
        d = tmp / f"{name}-{label}"
        if not (d / "config.json").exists():
            lm = load_model(str(src))
            qws = quantize_model(lm.model, scheme, "rtn", progress=False)
            ct.save_quantized(lm.model, qws, d, tokenizer=lm.tokenizer)
        out[label] = d
    return src, out, gs


def load(kind: str, src: Path, arts: dict[str, Path]) -> tuple[torch.nn.Module, str]:
    """``kind``: ``bf16`` / ``fp32`` (the reference), or ``<artifact>[-dequant|-head8][@fp32]``."""
    from transformers import AutoModelForCausalLM

    from lowbit.core.kernels import prepare_model
    from lowbit.formats import compressed_tensors as ct

    if kind in ("bf16", "fp32"):
        dt = torch.bfloat16 if kind == "bf16" else torch.float32
        return AutoModelForCausalLM.from_pretrained(src, dtype=dt).eval(), f"nn.Linear {kind}"
    kind, _, dname = kind.partition("@")
    dtype = torch.float32 if dname == "fp32" else torch.bfloat16
    label, _, backend = kind.partition("-")
    model, _ = ct.load_quantized(arts[label], dtype=dtype, cache=True)
    head8 = backend == "head8"
    report = prepare_model(model, "cpu", dtype=dtype, backend="auto" if head8 else backend or "auto",
                           int8_head=head8)
    return model.eval(), report.summary()


def llamacpp_q4_0(src: Path, tmp: Path, prompt_len: int, new: int, threads: int) -> dict[str, Any]:
    import llama_cpp

    from lowbit.formats.gguf.writer import write_gguf

    path = tmp / f"{src.name}-q4_0.gguf"
    if not path.exists():
        write_gguf(src, path, "Q4_0")
    llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=prompt_len + new + 8,
                          verbose=False)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, llm.n_vocab() - 100, (prompt_len,), generator=gen).tolist()
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(new - 1):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    dt = time.perf_counter() - t0
    return {"tokens_per_s": (new - 1) / dt, "gguf": str(path), "version": llama_cpp.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--configs", nargs="+", default=["bf16", "w4a16", "w8a16", "w4a16-head8"],
                    help="bf16 | fp32 | w4a16 | w8a16 | <w>-dequant (the fallback) | <w>-head8 (lm_head int8 at "
                         "load); @fp32 runs the model's other layers in float32 (the kernels stay bf16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step (every config)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lowbit-decode-cpu"))
    ap.add_argument("--out", default="bench/results/kernels/decode_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(args.work)
    tmp.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"info": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                       "torch": torch.__version__, "prompt": args.prompt, "new": args.new,
                                       "rounds": args.rounds, "argv": sys.argv}, "models": {}}
    for name in args.models:
        src, arts, gs = artifacts(name, tmp)
        models = {k: load(k, src, arts) for k in args.configs}
        rates: dict[str, list[float]] = {k: [] for k in args.configs}
        for _ in range(args.rounds):
            for k, (model, _) in models.items():
                with torch.inference_mode():
                    rates[k].append(decode_tokens_per_s(model, args.prompt, args.new, graphs=False, runs=1,
                                                        compile=args.compile)["tokens_per_s"])
        rows = {k: {"tokens_per_s": statistics.median(v), "rounds": v, "kernels": models[k][1]}
                for k, v in rates.items()}
        del models  # free them before the GGUF conversion (a shared 24 GB machine)
        gc.collect()
        if not args.no_llamacpp:
            try:
                rows["llama.cpp Q4_0"] = llamacpp_q4_0(src, tmp, args.prompt, args.new, args.threads)
            except Exception as e:  # noqa: BLE001 - not installed / failed: a result, not a crash
                rows["llama.cpp Q4_0"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        result["models"][name] = {"group_size": gs, "rows": rows}
        base = rows["bf16"]["tokens_per_s"] if "bf16" in rows else None
        print(f"\n{name} (W4A16 group {gs}, {args.threads} threads)")
        for k, r in rows.items():
            if "error" in r:
                print(f"  {k:16s} {r['error']}")
                continue
            ratio = f"x{r['tokens_per_s'] / base:5.2f}" if base else ""
            print(f"  {k:16s} {r['tokens_per_s']:7.2f} tok/s {ratio}  {r.get('kernels', r.get('gguf', ''))}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
