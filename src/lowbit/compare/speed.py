"""Speed and memory of one artifact on the engine meant for it, measured in a fresh process.

``python -m lowbit.compare.speed PATH --family gguf|hf --device cpu --json OUT`` loads the artifact
(GGUF through llama.cpp; everything else through lowbit's loader and runtime, on ``--device``),
warms up, then times ``--reps`` prefills of a ``--prompt``-token prompt (median) and a decode of
``--new`` tokens after the last one, batch 1. Memory is the process's peak resident set on the CPU
and the peak allocated device memory on a GPU. Every row names its engine and kernel, and says
``dequantized`` when the weights run as a dense matmul (no low-bit kernel on that device), so a slow
row is not mistaken for the method's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lowbit.core.errors import LowbitError


@dataclass
class SpeedResult:
    engine: str
    kernel: str
    dequantized: bool
    device: str
    threads: int
    load_seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    n_prompt: int
    n_gen: int
    reps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# runtime linear classes -> (kernel description, runs dequantized); a class may say better itself
# through a ``kernel_name`` attribute (lowbit's kernel-backed linears do)
_RUNTIMES = {
    "QuantLinear": ("dequantize + dense matmul", True),
    "Linear4bit": ("NF4/FP4 dequantize + dense matmul", True),
    "LLMInt8Linear": ("int8 GEMM (torch._int_mm) + 16-bit outlier columns", False),
    "W8A8Linear": ("int8 GEMM (torch._int_mm)", False),
}


def describe_runtime(model: Any, device: str) -> tuple[str, bool]:
    """(kernel description, dequantized?) of a loaded model's quantized linears."""
    seen: dict[str, bool] = {}
    for m in model.modules():
        name = getattr(m, "kernel_name", None)
        cls = type(m).__name__
        if isinstance(name, str):
            seen[name] = bool(getattr(m, "dequantized", False))
        elif cls in _RUNTIMES:
            seen[_RUNTIMES[cls][0]] = _RUNTIMES[cls][1]
        elif cls == "FP8Linear":
            fast = device.startswith("cuda") and not getattr(m, "block_size", None)
            seen["FP8 _scaled_mm" if fast else "FP8 emulated (upcast + dense matmul)"] = not fast
    if not seen:
        return "dense matmul (16-bit reference)", False
    return "; ".join(sorted(seen)), any(seen.values())


def _rss_peak() -> int:
    """This process's peak resident memory in bytes. Linux: ``VmHWM``, the high-water mark of the current
    address space (``ru_maxrss`` survives ``fork`` + ``exec``, so a worker would report its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux, bytes on macOS


def measure_hf(path: str, device: str, n_prompt: int, n_gen: int, reps: int, dtype_name: str) -> SpeedResult:
    import torch

    from lowbit.jobs.artifacts import load

    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    model, tok = load(path, device=device, dtype=dtype)
    config: Any = model.config
    config.use_cache = True
    load_s = time.perf_counter() - t0
    kernel, deq = describe_runtime(model, device)
    vocab = int(config.vocab_size)
    rng = random.Random(0)
    prompt = torch.tensor([[rng.randrange(vocab) for _ in range(n_prompt)]], device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def prefill(ids: torch.Tensor) -> Any:
        return model(ids, use_cache=True)

    with torch.inference_mode():
        out = prefill(prompt[:, :16])  # warm-up
        step = out.logits[:, -1:].argmax(-1)
        model(step, past_key_values=out.past_key_values, use_cache=True)
        times = []
        for _ in range(max(1, reps)):
            sync()
            t = time.perf_counter()
            out = prefill(prompt)
            sync()
            times.append(time.perf_counter() - t)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        t = time.perf_counter()
        for _ in range(n_gen):
            o = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
        sync()
        dec = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss_peak()
    return SpeedResult("transformers + lowbit runtime", kernel, deq, device, torch.get_num_threads(), load_s,
                       n_prompt / statistics.median(times), n_gen / dec, int(peak), n_prompt, n_gen, reps)


def measure_gguf(path: str, threads: int, n_prompt: int, n_gen: int, reps: int) -> SpeedResult:
    from lowbit.eval.llamacpp import open_llama, speed

    t0 = time.perf_counter()
    llm = open_llama(path, n_prompt + n_gen + 8, logits_all=False, threads=threads, flash_attn=True)
    load_s = time.perf_counter() - t0
    s = speed(llm, n_prompt=n_prompt, n_gen=n_gen, reps=reps)
    return SpeedResult("llama.cpp (llama-cpp-python)", "llama.cpp CPU kernels for the file's types, flash attention",
                       False, "cpu", s.threads, load_s, s.prefill_tps, s.decode_tps, _rss_peak(), s.n_prompt,
                       s.n_gen, reps)


def run_speed(path: str | Path, family: str, *, device: str = "cpu", threads: int | None = None,
              n_prompt: int = 512, n_gen: int = 128, reps: int = 3, dtype: str = "bfloat16",
              timeout: float = 1800) -> SpeedResult:
    """Measure ``path`` in a fresh Python process (so one artifact's memory and caches never shape another's)."""
    out = Path(str(path) + ".speed.json") if Path(path).is_file() else Path(path) / ".speed.json"
    cmd = [sys.executable, "-m", "lowbit.compare.speed", str(path), "--family", family, "--device", device,
           "--prompt", str(n_prompt), "--new", str(n_gen), "--reps", str(reps), "--dtype", dtype, "--json", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    # the worker imports the same lowbit as this process, installed or not
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise LowbitError(f"speed measurement of {path} took longer than {timeout:.0f} s") from e
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout)[-1500:]
        raise LowbitError(f"speed measurement of {path} failed (exit {proc.returncode}): {tail}")
    data = json.loads(out.read_text())
    out.unlink()
    return SpeedResult(**data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.compare.speed")
    p.add_argument("path")
    p.add_argument("--family", choices=["gguf", "hf"], required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = a.threads or torch.get_num_threads()
    if a.family == "gguf":
        res = measure_gguf(a.path, threads, a.prompt, a.new, a.reps)
    else:
        res = measure_hf(a.path, a.device, a.prompt, a.new, a.reps, a.dtype)
    Path(a.json).write_text(json.dumps(res.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
