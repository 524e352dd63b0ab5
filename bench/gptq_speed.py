"""GPTQ speed on one GPU: lowbit vs llm-compressor, on a Llama-3-8B-shaped random model.

    PYTHONPATH=src python bench/gptq_speed.py --layers 32 --samples 128 --seq 2048 --peer-layers 4 --out OUT

The model is built from the Llama-3-8B config (random bf16 weights, normal * 0.02, norms = 1,
no checkpoint needed), calibrated on seeded random tokens. Measured:

* the device's bf16 / fp32 matmul rates (8192^3, CUDA events, median) and copy bandwidths;
* lowbit's ``run_blockwise`` + ``GPTQMethod`` (W4A16 g128, true-sequential) on the full model and
  on a small model of ``--peer-layers`` layers, with activations on the GPU and/or offloaded to
  pinned CPU memory: total seconds, per-block seconds, phase seconds (the method's timers) against
  their floors (FLOPs over the measured rate), peak GPU memory against "one block in bf16 + its
  Hessians in fp32";
* packing (``pack_tensors``) of every result;
* llm-compressor's ``oneshot`` + ``GPTQModifier(scheme="W4A16")`` on the small model, in a
  subprocess (its imports and patches stay out of lowbit's process), same tokens, same weights.

Prints one table last and writes ``OUT/gptq_speed.json`` (rewritten after every stage).
"""

from __future__ import annotations

from lowbit.cudaenv import tune_pinned_allocator

tune_pinned_allocator()  # as the CLI does, before torch loads (it reads its allocator settings once)

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

SEED = 1234


# ----------------------------------------------------------------------------------------- model


def _fresh_peak(dev: torch.device) -> None:
    """Free what can be freed and restart the device's peak-memory counter before a timed run."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)


def llama3_8b_config(layers: int, tiny: bool) -> Any:
    from transformers import LlamaConfig

    if tiny:  # CPU smoke test: same structure, small sizes (multiples of 128 for g128)
        dims = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=1000)
    else:
        dims = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=128256)
    return LlamaConfig(num_hidden_layers=layers, rope_theta=500000.0, max_position_embeddings=8192,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
                       bos_token_id=128000 if not tiny else 1, eos_token_id=128001 if not tiny else 2,
                       hidden_act="silu", attention_bias=False, mlp_bias=False, **dims)


def build_model(cfg: Any, dev: torch.device, seed: int = SEED) -> torch.nn.Module:
    """bf16 LlamaForCausalLM on the CPU, no slow init; every parameter drawn on ``dev`` and copied."""
    from transformers import LlamaForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef,attr-defined]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                buf = torch.empty(p.shape, dtype=p.dtype, device=dev).normal_(0.0, 0.02, generator=g)
                p.copy_(buf)
                del buf
    return model


def random_tokens(n: int, t: int, vocab: int, seed: int = SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g, dtype=torch.int64)


# ----------------------------------------------------------------------------------- device rates


def _median_ms(fn: Any, dev: torch.device, reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if dev.type != "cuda":
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def bf16_matmul_rate(dev: torch.device, n: int = 8192) -> float:
    """FLOP/s of an ``n x n`` bf16 matmul on ``dev`` (3 warm-up runs, then 10 timed together)."""
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        x @ x
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        x @ x
    torch.cuda.synchronize(dev)
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def measure_rates(dev: torch.device, tiny: bool) -> dict[str, float]:
    """bf16 and fp32 (as the process runs them: tf32 off unless enabled) matmul FLOP/s, copy B/s."""
    n = 1024 if tiny else 8192
    r: dict[str, float] = {"matmul_n": n, "fp32_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    g = torch.Generator(device=dev).manual_seed(7)
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        b = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        c = torch.empty(n, n, device=dev, dtype=dt)
        ms = _median_ms(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), dev, reps=10 if name == "bf16" else 5)
        r[f"{name}_flops"] = 2 * n**3 / (ms * 1e-3)
        del a, b, c
    nbytes = (64 if tiny else 2048) * 2**20
    x = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_(generator=g)
    y = torch.empty_like(x)
    ms = _median_ms(lambda x=x, y=y: y.copy_(x), dev)
    r["copy_bytes_per_s"] = 2 * nbytes / (ms * 1e-3)  # read + write
    del x, y
    if dev.type == "cuda":
        h = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True).uniform_()
        d = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
        r["h2d_pinned_bytes_per_s"] = nbytes / (_median_ms(lambda: d.copy_(h, non_blocking=True), dev, 5, 1) * 1e-3)
        hp = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
        r["h2d_pageable_bytes_per_s"] = nbytes / (_median_ms(lambda: d.copy_(hp), dev, 3, 1) * 1e-3)
        del h, d, hp
    cx = torch.empty((64 if tiny else 1024) * 2**18, dtype=torch.float32).uniform_()
    cy = torch.empty_like(cx)
    cms = _median_ms(lambda cx=cx, cy=cy: cy.copy_(cx), torch.device("cpu"), 5, 1)
    r["cpu_copy_bytes_per_s"] = 2 * cx.numel() * 4 / (cms * 1e-3)
    del cx, cy
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return r


# ------------------------------------------------------------------------------- shapes & floors


def block_shapes(cfg: Any) -> dict[str, Any]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    lin = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
           "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # (out, in)
    groups = [  # (rows stacked, in) per solve, as lowbit groups linears sharing an input
        ("qkv", h + 2 * kv, h), ("o", h, h), ("gate+up", 2 * i, h), ("down", h, i)]
    lin_params = sum(o * n for o, n in lin.values())
    block_params = lin_params + 2 * h  # two RMSNorm weights
    return {"linears": lin, "groups": groups, "lin_params": lin_params, "block_params": block_params,
            "hessian_bytes": sum(n * n * 4 for _, _, n in groups), "block_bytes_bf16": block_params * 2}


def floors(cfg: Any, layers: int, n: int, t: int, rates: dict[str, float]) -> dict[str, dict[str, float]]:
    """FLOPs (or bytes) and floor seconds of each phase, for ``layers`` blocks."""
    s = block_shapes(cfg)
    tokens = n * t
    h = cfg.hidden_size
    fwd_one = 2 * s["lin_params"] * tokens + 2 * t * t * h * n  # linears + causal attention (QK^T, PV halved)
    bf, fp, bw = rates["bf16_flops"], rates["fp32_flops"], rates["copy_bytes_per_s"]
    stages = len(s["groups"])
    hess = sum(2 * k * k * tokens for _, _, k in s["groups"])
    chol = sum(k**3 for _, _, k in s["groups"])
    cols = sum(2 * r * k * k for _, r, k in s["groups"])
    wb_bytes = s["lin_params"] * (1 + 2 + 4)  # codes read, bf16 written, fp32 temp (lower bound-ish)
    f = {
        "forward (hooked, excl. Hessian)": {"work": layers * stages * fwd_one, "unit": "FLOP", "rate": bf},
        "hessian": {"work": layers * hess, "unit": "FLOP", "rate": bf},
        "cholesky/inverse": {"work": layers * chol, "unit": "FLOP", "rate": fp},
        "columns": {"work": layers * cols, "unit": "FLOP", "rate": fp},
        "write-back": {"work": layers * wb_bytes, "unit": "B", "rate": bw},
        "output pass + moves": {"work": layers * fwd_one, "unit": "FLOP", "rate": bf},
    }
    for v in f.values():
        v["floor_s"] = v["work"] / v["rate"]
    return f


# ---------------------------------------------------------------------------------- lowbit runs


def gptq_config(a: argparse.Namespace) -> Any:
    """lowbit's GPTQConfig: its defaults, with act-order forced on/off, --asym-alpha and --asym-scope
    where given."""
    from lowbit.methods.gptq import GPTQConfig

    kw: dict[str, Any] = {} if a.act_order == "default" else {"act_order": a.act_order == "on"}
    if a.asym_alpha is not None:
        kw["asym_alpha"] = a.asym_alpha
    if a.asym_scope is not None:
        kw["asym_scope"] = a.asym_scope
    return GPTQConfig(**kw)


class TimedMethod:
    """Wraps a block method: per-block timestamps, peak memory of capture vs. the block loop."""

    def __init__(self, inner: Any, dev: torch.device) -> None:
        self.inner = inner
        self.dev = dev
        self.needs_calibration = inner.needs_calibration
        self.writes_back = getattr(inner, "writes_back", False)
        self.float_inputs = getattr(inner, "float_inputs", False)  # GPTAQ: the engine carries float inputs too
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.capture_peak = 0
        self.rest_peak = 0

    def _sync(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.perf_counter()

    def quantize_block(self, ctx: Any) -> Any:
        t = self._sync()
        if not self.starts and self.dev.type == "cuda":
            self.capture_peak = torch.cuda.max_memory_allocated(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        if self.starts and self.dev.type == "cuda":  # peak of the previous output pass + moves
            self.rest_peak = max(self.rest_peak, torch.cuda.max_memory_allocated(self.dev))
        self.starts.append(t)
        out = self.inner.quantize_block(ctx)
        self.ends.append(self._sync())
        return out


REPLAY = [True]  # GPTQMethod.replay_attention (--no-replay turns it off)
TIMELINE = [False]  # --timeline: non-synchronising per-phase marks in the untimed runs
ENGINE: dict[str, bool] = {}  # run_blockwise options set by the A/B flags (--no-warm-forward, --no-fused-norm)


def run_lowbit(model: torch.nn.Module, tokens: torch.Tensor, dev: torch.device, offload: bool,
               cfg: Any, layers: int, rates: dict[str, float], gcfg: Any, timed: bool = True
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    from lowbit.core.scheme import QuantScheme
    from lowbit.pipeline.blockwise import run_blockwise
    from lowbit.pipeline.gptq import GPTQMethod
    from lowbit.pipeline.hessian import Timeline

    timers: dict[str, float] = {}
    tl = Timeline(dev) if TIMELINE[0] and not timed else None
    method = TimedMethod(GPTQMethod(QuantScheme(4, 128, True), gcfg, timers=timers if timed else None,
                                    replay_attention=REPLAY[0], timeline=tl), dev)
    _fresh_peak(dev)
    t0 = time.perf_counter()
    result = run_blockwise(model, method, tokens, device=dev, progress=False, offload_activations=offload,
                           **ENGINE)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t1 = time.perf_counter()
    if tl is not None:
        tl.mark("end")
    block_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    phase_peaks = {k[5:]: v for k, v in timers.items() if k.startswith("peak:")}
    phase_peaks["output pass + moves"] = max(method.rest_peak, block_peak)
    block_peak = max([block_peak, *phase_peaks.values()])
    for k in list(timers):
        if k.startswith("peak:"):
            del timers[k]
    st, en = method.starts, method.ends
    per_block = [b - a for a, b in zip(st, st[1:] + [t1], strict=True)]
    inside = sum(b - a for a, b in zip(st, en, strict=True))
    after = sum(b - a for a, b in zip(en, st[1:] + [t1], strict=True))  # dequant copy, to cpu, output pass, moves
    fh = timers.get("forward+hessian", 0.0)
    hs = timers.get("hessian", 0.0)
    phases = {
        "capture (embed + probe)": st[0] - t0,
        "forward (hooked, excl. Hessian)": fh - hs,
        "hessian": hs,
        "cholesky/inverse": timers.get("cholesky", 0.0),
        "columns": timers.get("columns", 0.0),
        "write-back": timers.get("write-back", 0.0),
        "other in quantize_block": inside - fh - timers.get("cholesky", 0.0) - timers.get("columns", 0.0)
        - timers.get("write-back", 0.0),
        "output pass + moves": after,
    }
    s = block_shapes(cfg)
    ref = s["block_bytes_bf16"] + s["hessian_bytes"]
    peak = max(block_peak, method.capture_peak)
    rec = {"layers": layers, "offload_activations": offload, "phase_timers": timed, "total_s": t1 - t0,
           "gptq_config": dataclasses.asdict(gcfg),
           "per_layer_s": (t1 - t0) / layers,
           "per_block_s": per_block, "raw_timers": dict(timers), "phases_s": phases,
           "peak_bytes": peak, "peak_capture_bytes": method.capture_peak,
           "phase_peak_bytes": phase_peaks, "peak_blocks_bytes": block_peak,
           "mem_ref_bytes": ref, "peak_over_ref": peak / ref, "blocks_peak_over_ref": block_peak / ref,
           "floors": floors(cfg, layers, tokens.shape[0], tokens.shape[1], rates)}
    if tl is not None:  # from block 0's first stage to the end; the capture is not in it
        rec["timeline_s"] = tl.totals()
        rec["timeline_per_block_s"] = tl.per_block()
    return rec, result


def profile_run(model: torch.nn.Module, tokens: torch.Tensor, dev: torch.device, offload: bool, path: Path,
                gcfg: Any) -> None:
    """One untimed lowbit run under ``torch.profiler``: the top ops by device and by host time."""
    from torch.profiler import ProfilerActivity, profile

    from lowbit.core.scheme import QuantScheme
    from lowbit.pipeline.blockwise import run_blockwise
    from lowbit.pipeline.gptq import GPTQMethod

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    if dev.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    method = GPTQMethod(QuantScheme(4, 128, True), gcfg, replay_attention=REPLAY[0])
    _fresh_peak(dev)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        run_blockwise(model, method, tokens, device=dev, progress=False, offload_activations=offload,
                      **ENGINE)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    mem = ""
    if dev.type == "cuda":
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        try:
            mem = live_at_peak(snap, dev.index or 0)
        except Exception as e:  # diagnostics only: never lose the timed runs to it
            mem = f"memory trace not read: {e!r}"
        print(mem, flush=True)
    busy = device_busy(prof) if dev.type == "cuda" else ""
    if busy:
        print(busy, flush=True)
    ka = prof.key_averages()
    dev_key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    text = (f"profiled run: {wall:.2f} s wall, offload={offload}\n\n{busy}\n\n{mem}\n\n== by self device time ==\n"
            + ka.table(sort_by=dev_key, row_limit=45, max_name_column_width=60)
            + "\n\n== by host time (cpu_time_total) ==\n"
            + ka.table(sort_by="cpu_time_total", row_limit=45, max_name_column_width=60))
    path.write_text(text)
    print(f"[profile] {wall:.2f} s under the profiler; tables in {path}", flush=True)
    print(ka.table(sort_by=dev_key, row_limit=25, max_name_column_width=50), flush=True)


def _union(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(iv: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in iv)


def _intersect(x: list[tuple[int, int]], y: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def device_busy(prof: Any) -> str:
    """How the profiled span splits on the device: kernels running, host-to-device copies running
    with no kernel (upload-bound), and neither (the GPU waits for the host: syncs, Python, launches).
    From the profiler's device events (union of intervals over all streams)."""
    cats: dict[str, list[tuple[int, int]]] = {"kernel": [], "h2d": [], "d2h": [], "other": []}
    try:
        for e in prof.profiler.kineto_results.events():
            if str(e.device_type()).endswith("CUDA") and e.duration_ns() > 0:
                n = e.name()
                c = ("h2d" if n.startswith("Memcpy HtoD") else "d2h" if n.startswith("Memcpy DtoH")
                     else "other" if n.startswith(("Memcpy", "Memset")) else "kernel")
                cats[c].append((e.start_ns(), e.start_ns() + e.duration_ns()))
    except Exception as e:  # diagnostics only
        return f"device busy: not read ({e!r})"
    u = {k: _union(v) for k, v in cats.items()}
    every = _union([iv for v in u.values() for iv in v])
    if not every:
        return "device busy: no device events"
    span = every[-1][1] - every[0][0]
    k, h = _length(u["kernel"]), _length(u["h2d"])
    both = _length(_intersect(u["kernel"], u["h2d"]))
    ms = 1e-6
    return (f"device span {span * ms:.0f} ms: kernels {k * ms:.0f} ms ({k / span:.0%}), H2D copies {h * ms:.0f} ms "
            f"({both * ms:.0f} ms of it under kernels, {(h - both) * ms:.0f} ms alone), D2H copies "
            f"{_length(u['d2h']) * ms:.0f} ms, nothing on the device {(span - _length(every)) * ms:.0f} ms "
            f"({(span - _length(every)) / span:.0%})")


def live_at_peak(snap: dict[str, Any], index: int, top: int = 18) -> str:
    """Replay the allocator's trace: the allocations live at the moment of peak allocated memory,
    summed by the innermost lowbit / transformers / torch.nn frame that made them."""
    trace = snap["device_traces"][index]
    live: dict[int, int] = {}
    total = best = best_at = 0
    for k, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            total += ev["size"]
            if total > best:
                best, best_at = total, k
        elif ev["action"] in ("free_requested",) and ev["addr"] in live:
            total -= live.pop(ev["addr"])
    live_ev: dict[int, dict[str, Any]] = {}
    for ev in trace[: best_at + 1]:
        if ev["action"] == "alloc":
            live_ev[ev["addr"]] = ev
        elif ev["action"] == "free_requested":
            live_ev.pop(ev["addr"], None)
    groups: dict[str, list[int]] = {}
    for ev in live_ev.values():
        where = "?"
        for f in ev.get("frames", []):
            fn = f.get("filename", "")
            if any(s in fn for s in ("lowbit", "transformers", "torch/nn", "gptq_speed")):
                where = f"{fn.split('/')[-1]}:{f.get('line')} {f.get('name')}"
                break
        g = groups.setdefault(where, [0, 0])
        g[0] += ev["size"]
        g[1] += 1
    lines = [f"live at peak ({best / 2**30:.3f} GiB allocated, trace event {best_at} of {len(trace)}):"]
    for where, (b, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {b / 2**30:8.3f} GiB  {n:5d} x  {where}")
    return "\n".join(lines)


def capture_probe(model: torch.nn.Module, tokens: torch.Tensor, dev: torch.device) -> dict[str, Any]:
    """Peak GPU memory of lowbit's ``capture_inputs`` (2 samples; the first probes every block), as
    ``run_blockwise`` calls it (grad mode on) and under ``torch.no_grad()``."""
    import contextlib

    from lowbit.models.archs import get_arch
    from lowbit.pipeline.blockwise import capture_inputs

    spec = get_arch(model)
    res: dict[str, Any] = {}
    for mode in ("as called", "no_grad"):
        _fresh_peak(dev)
        t0 = time.perf_counter()
        with torch.no_grad() if mode == "no_grad" else contextlib.nullcontext():
            hidden, kw = capture_inputs(model, tokens[:2], spec, dev, offload=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        res[mode] = {"seconds": time.perf_counter() - t0,
                     "peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0,
                     "hidden_requires_grad": bool(hidden[0].requires_grad)}
        del hidden, kw
    return res


def time_packing(result: dict[str, Any], where: torch.device, blocks: int | None = None) -> dict[str, Any]:
    """Seconds of ``pack_tensors`` over every result (or those of the first ``blocks`` blocks)."""
    from lowbit.formats.compressed_tensors import pack_tensors

    if blocks is not None:
        result = {k: v for k, v in result.items() if int(k.split(".")[2]) < blocks}

    sync = (lambda: torch.cuda.synchronize(where)) if where.type == "cuda" else (lambda: None)
    moved = result
    t_up = 0.0
    if where.type == "cuda":
        t0 = time.perf_counter()
        moved = {k: type(q)(q.codes.to(where), q.scales.to(where), q.zeros.to(where), q.scheme, q.g_idx)
                 for k, q in result.items()}
        sync()
        t_up = time.perf_counter() - t0
    sync()
    t0 = time.perf_counter()
    nbytes = 0
    for name, qw in moved.items():
        out = pack_tensors(name, qw, torch.bfloat16)
        nbytes += sum(v.numel() * v.element_size() for v in out.values())
        del out
    sync()
    dt = time.perf_counter() - t0
    codes = sum(q.codes.numel() for q in result.values())
    return {"device": str(where), "seconds": dt, "upload_s": t_up, "linears": len(result), "codes": codes,
            "packed_bytes": nbytes, "blocks_packed": blocks}


# ------------------------------------------------------------------------------ llm-compressor


def make_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|bos|>", "<|eos|>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|eos|>")
    fast.save_pretrained(str(folder))
    return fast


def peer_child(a: argparse.Namespace) -> None:
    """Runs in a subprocess: llm-compressor's GPTQ on the small model; prints PEER_RESULT {json}."""
    dev = torch.device(a.device)
    cfg = llama3_8b_config(a.peer_layers, a.tiny)
    folder = Path(a.work) / "peer_model"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg.save_pretrained(str(folder))
    tok = make_tokenizer(folder)
    model = build_model(cfg, dev)
    model.config._name_or_path = str(folder)
    tokens = random_tokens(a.samples, a.seq, cfg.vocab_size)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    if dev.type != "cuda":
        from llmcompressor.pipelines import cache
        cache.IntermediatesCache.pin_memory = lambda self, *x, **k: None  # type: ignore[method-assign]
    t_import = time.perf_counter() - t0
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, tokenizer=tok, num_calibration_samples=a.samples,
            max_seq_length=a.seq)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    import llmcompressor

    q = model.model.layers[0].self_attn.q_proj
    rec = {"tool": "llmcompressor", "version": getattr(llmcompressor, "__version__", "?"),
           "layers": a.peer_layers, "total_s": dt, "per_layer_s": dt / a.peer_layers, "peak_bytes": peak,
           "build_s": t_build, "import_s": t_import,
           "quantized": any(k.startswith("weight_scale") for k, _ in q.named_parameters())
           or hasattr(q, "quantization_scheme")}
    print("PEER_RESULT " + json.dumps(rec), flush=True)


def run_peer(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--peer-child", "--peer-layers", str(a.peer_layers),
           "--samples", str(a.samples), "--seq", str(a.seq), "--device", a.device, "--out", str(out),
           "--work", a.work]
    env = dict(os.environ)
    if a.peer_path:  # llm-compressor's packages (and their pins) reach the subprocess only
        env["PYTHONPATH"] = os.pathsep.join([a.peer_path, *filter(None, [env.get("PYTHONPATH")])])
    if a.tiny:
        cmd.append("--tiny")
    t0 = time.perf_counter()
    log = out / "peer_log.txt"
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        f.write(p.stdout)
    wall = time.perf_counter() - t0
    solve = [float(m) for m in re.findall(r"GPTQ \| METRIC - time ([0-9.]+)s", p.stdout)]
    for line in p.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            rec = json.loads(line[len("PEER_RESULT "):])
            rec["subprocess_wall_s"] = wall
            rec["gptq_solve_s_sum"] = sum(solve)  # its per-module 'METRIC - time' lines (solve only)
            rec["gptq_solves"] = len(solve)
            return rec
    tail = "\n".join(p.stdout.splitlines()[-40:])
    print(f"[peer] FAILED (rc {p.returncode}); last lines:\n{tail}", flush=True)
    return {"error": f"rc {p.returncode}", "tail": tail, "subprocess_wall_s": wall}


# -------------------------------------------------------------------------------------- report


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def print_phase_table(rec: dict[str, Any]) -> None:
    f = rec["floors"]
    print(f"\n  phases, lowbit {rec['layers']} layers, offload_activations={rec['offload_activations']}: "
          f"total {rec['total_s']:.2f} s")
    print(f"  {'phase':34s} {'seconds':>9s} {'floor s':>9s} {'ratio':>8s}  work")
    tot_floor = 0.0
    for k, v in rec["phases_s"].items():
        fl = f.get(k)
        if fl:
            tot_floor += fl["floor_s"]
            print(f"  {k:34s} {v:9.3f} {fl['floor_s']:9.4f} {v / max(fl['floor_s'], 1e-12):8.1f}  "
                  f"{fl['work']:.3g} {fl['unit']} @ {fl['rate']:.3g}/s")
        else:
            print(f"  {k:34s} {v:9.3f} {'-':>9s} {'-':>8s}")
    print(f"  {'total':34s} {rec['total_s']:9.3f} {tot_floor:9.4f} {rec['total_s'] / max(tot_floor, 1e-12):8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--peer-layers", type=int, default=4, help="llm-compressor on a model of that many layers; 0 skips")
    p.add_argument("--lowbit-layers-small", type=int, default=4, help="lowbit on the small model too; 0 skips")
    p.add_argument("--offload", choices=["both", "on", "off"], default="both")
    p.add_argument("--pack", choices=["auto", "cpu", "gpu", "none"], default="auto",
                   help="auto: small model on CPU and GPU, full model on GPU")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny hidden sizes (CPU smoke test)")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="skip a further lowbit run of a model when it would likely end past this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--capture-probe", action="store_true",
                   help="peak memory of capture_inputs with grad mode on (as run_blockwise calls it) vs no_grad")
    p.add_argument("--act-order", choices=["default", "on", "off"], default="default",
                   help="lowbit GPTQConfig.act_order (default: the library's default); llm-compressor uses static")
    p.add_argument("--asym-alpha", type=float, default=None,
                   help="lowbit GPTQConfig.asym_alpha (GPTAQ strength; default: the library's default)")
    from lowbit.methods.gptq import ASYM_SCOPES

    p.add_argument("--asym-scope", default=None, choices=ASYM_SCOPES,
                   help="lowbit GPTQConfig.asym_scope (the groups GPTAQ aims; default: the library's default)")
    p.add_argument("--untimed-only", action="store_true",
                   help="lowbit runs without the phase timers only (the total and the peak, no phase table)")
    p.add_argument("--peer-path", default="", help="prepended to PYTHONPATH of the llm-compressor subprocess")
    p.add_argument("--work", default="/tmp/gptq_speed_work", help="scratch folder (the peer's config + tokenizer)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over one lowbit run of the small model (tables in OUT/gptq_profile.txt)")
    p.add_argument("--no-replay", action="store_true",
                   help="lowbit without the attention replay (GPTQMethod.replay_attention=False), for A/B runs")
    p.add_argument("--timeline", action="store_true",
                   help="per-phase time of the untimed runs from CUDA events (no synchronisation): each stage's "
                        "forward, each group's solve, the engine's output pass")
    p.add_argument("--no-prewarm", action="store_true",
                   help="lowbit without the background pinning of host memory and GPTQ warm-up, for A/B runs")
    p.add_argument("--no-warm-forward", action="store_true",
                   help="lowbit without the engine's warm-up forward of block 0 (run_blockwise(warm_forward=False))")
    p.add_argument("--no-fused-norm", action="store_true",
                   help="lowbit with transformers' eager RMSNorm (run_blockwise(fuse_norms=False)), for A/B runs")
    p.add_argument("--peer-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    REPLAY[0] = not a.no_replay
    TIMELINE[0] = a.timeline
    if a.no_prewarm:  # A/B: the engine pins its host activations as it goes, and GPTQ compiles in block 0
        import lowbit.pipeline.blockwise as bw
        from lowbit.pipeline.gptq import GPTQMethod

        bw.prewarm_pinned = lambda *args, **kw: None  # type: ignore[assignment]
        GPTQMethod.prepare = lambda self, device: None  # type: ignore[method-assign]
    if a.no_warm_forward:  # A/B: block 0's first forward loads the layer's kernels inside the method
        ENGINE["warm_forward"] = False
    if a.no_fused_norm:  # A/B: each norm as transformers' six eager kernels
        ENGINE["fuse_norms"] = False
    if a.peer_child:
        peer_child(a)
        return
    import logging

    logging.basicConfig(level=logging.WARNING)
    gcfg = gptq_config(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    import transformers

    rep: dict[str, Any] = {"args": vars(a), "torch": torch.__version__, "transformers": transformers.__version__,
                           "lowbit_gptq_config": dataclasses.asdict(gcfg),
                           "python": platform.python_version(),
                           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}

    def save() -> None:
        (out / "gptq_speed.json").write_text(json.dumps(rep, indent=1, default=str))

    print(f"device {rep['device']}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"lowbit GPTQConfig {rep['lowbit_gptq_config']}", flush=True)
    t_all = time.perf_counter()
    rates = measure_rates(dev, a.tiny)
    rep["rates"] = rates
    save()
    print(f"bf16 matmul {rates['bf16_flops'] / 1e12:.0f} TFLOP/s, fp32 matmul {rates['fp32_flops'] / 1e12:.1f} "
          f"TFLOP/s (allow_tf32={rates['fp32_allow_tf32']}), copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"H2D pinned {rates.get('h2d_pinned_bytes_per_s', 0) / 1e9:.1f} GB/s, pageable "
          f"{rates.get('h2d_pageable_bytes_per_s', 0) / 1e9:.1f} GB/s, CPU copy "
          f"{rates['cpu_copy_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    modes = {"both": [False, True], "on": [True], "off": [False]}[a.offload]
    rep["lowbit"] = []
    rep["packing"] = []

    def lowbit_on(layers: int, pack_where: list[str], untimed_too: bool) -> None:
        cfg = llama3_8b_config(layers, a.tiny)
        t0 = time.perf_counter()
        model = build_model(cfg, dev)
        tokens = random_tokens(a.samples, a.seq, cfg.vocab_size)
        tb = time.perf_counter() - t0
        print(f"\n[lowbit] built {layers}-layer model in {tb:.1f} s "
              f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params)", flush=True)
        if a.capture_probe:
            rep.setdefault("capture_probe", {})[layers] = cp = capture_probe(model, tokens, dev)
            save()
            for mode, v in cp.items():
                print(f"[capture probe] {layers} layers, {mode}: {v['seconds']:.2f} s, peak {gib(v['peak_bytes'])}, "
                      f"hidden requires_grad={v['hidden_requires_grad']}", flush=True)
        if a.profile and layers == a.lowbit_layers_small:
            profile_run(model, tokens, dev, modes[-1], out / "gptq_profile.txt", gcfg)
        runs = [(off, True) for off in modes] + ([(modes[0], False)] if untimed_too else [])
        if a.untimed_only:  # the runs that count: no phase timers (they synchronise after every phase)
            runs = [(off, False) for off in modes]
        last = 0.0
        for k, (off, timed) in enumerate(runs):
            left = a.time_budget - (time.perf_counter() - t_all)
            if k and left < 1.15 * last + 10:
                print(f"[lowbit] skipping {layers} layers offload={off} timers={timed}: {left:.0f} s left of "
                      f"--time-budget, last run took {last:.0f} s", flush=True)
                rep.setdefault("skipped", []).append({"layers": layers, "offload": off, "timers": timed})
                save()
                continue
            rec, result = run_lowbit(model, tokens, dev, off, cfg, layers, rates, gcfg, timed=timed)
            last = rec["total_s"]
            rec["build_s"] = tb
            rec["note"] = "weights already fake-quantized by the previous run" if k else "fresh random weights"
            rep["lowbit"].append(rec)
            save()
            pb = rec["per_block_s"]
            print(f"[lowbit] {layers} layers offload={off} timers={timed}: total {rec['total_s']:.2f} s, per layer "
                  f"{rec['per_layer_s']:.3f} s (block 0 {pb[0]:.3f}, median {statistics.median(pb):.3f}), "
                  f"peak {gib(rec['peak_bytes'])} (capture {gib(rec['peak_capture_bytes'])}, blocks "
                  f"{gib(rec['peak_blocks_bytes'])}), ref {gib(rec['mem_ref_bytes'])}, "
                  f"peak/ref {rec['peak_over_ref']:.2f}", flush=True)
            if "timeline_s" in rec:
                print(f"  timeline (device clock, no syncs; {layers} blocks): " + ", ".join(
                    f"{k} {v:.2f} s ({v / layers * 1e3:.0f} ms a block)" for k, v in rec["timeline_s"].items()),
                    flush=True)
                blocks = rec["timeline_per_block_s"]
                if len(blocks) > 1:  # where block 0's extra time goes
                    print("  block 0 vs the median block (ms): " + ", ".join(
                        f"{k} {v * 1e3:.0f} vs {statistics.median(b.get(k, 0.0) for b in blocks[1:]) * 1e3:.0f}"
                        for k, v in blocks[0].items()), flush=True)
            if timed:
                print_phase_table(rec)
                print("  peak GPU memory by phase: " + ", ".join(
                    f"{k} {gib(v)}" for k, v in sorted(rec["phase_peak_bytes"].items(), key=lambda kv: -kv[1])))
            if k == 0:
                for w in pack_where:
                    where = torch.device("cpu") if w == "cpu" else dev
                    nb = 1 if w == "cpu" else None  # CPU packing is slow: one block, scaled by the layer count
                    pk = time_packing(result, where, nb)
                    pk["layers"] = layers
                    pk["seconds_all_layers_est"] = pk["seconds"] * (layers if nb else 1)
                    rep["packing"].append(pk)
                    save()
                    print(f"[pack] {layers} layers on {pk['device']} ({nb or layers} block(s) packed): "
                          f"{pk['seconds']:.2f} s (+ upload {pk['upload_s']:.2f} s), {pk['linears']} linears, "
                          f"{pk['codes'] / 1e9:.3f} B codes -> {pk['packed_bytes'] / 2**30:.3f} GiB; all {layers} "
                          f"layers ~ {pk['seconds_all_layers_est']:.2f} s", flush=True)
            del result
            gc.collect()
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    gpu = [] if dev.type != "cuda" else ["gpu"]
    if a.lowbit_layers_small:
        lowbit_on(a.lowbit_layers_small, {"auto": ["cpu", *gpu], "cpu": ["cpu"], "gpu": gpu, "none": []}[a.pack],
                  untimed_too=True)
    if a.peer_layers:
        print(f"\n[peer] llm-compressor on {a.peer_layers} layers (subprocess) ...", flush=True)
        rep["peer"] = run_peer(a, out)
        save()
        if "total_s" in rep["peer"]:
            pr = rep["peer"]
            print(f"[peer] total {pr['total_s']:.2f} s, per layer {pr['per_layer_s']:.3f} s, GPTQ solves "
                  f"{pr['gptq_solve_s_sum']:.2f} s over {pr['gptq_solves']} modules, peak "
                  f"{gib(pr['peak_bytes'])} (build {pr['build_s']:.1f} s, import {pr['import_s']:.1f} s, "
                  f"quantized={pr['quantized']})", flush=True)
    if a.layers:
        lowbit_on(a.layers, {"auto": gpu, "cpu": ["cpu"], "gpu": gpu, "none": []}[a.pack], untimed_too=True)
    rep["wall_s"] = time.perf_counter() - t_all
    save()

    # ---------------------------------------------------------------------------- final table
    print("\n=== GPTQ W4A16 g128, "
          f"{a.samples} x {a.seq} random tokens, {rep['device']} ===")
    print(f"{'run':44s} {'total s':>9s} {'s/layer':>8s} {'peak':>11s} {'ref':>10s} {'peak/ref':>8s}")
    peer = rep.get("peer", {})
    for r in rep["lowbit"]:
        name = (f"lowbit {r['layers']}L offload={'on' if r['offload_activations'] else 'off'}"
                + ("" if r["phase_timers"] else " no-timers"))
        print(f"{name:44s} {r['total_s']:9.2f} {r['per_layer_s']:8.3f} {gib(r['peak_bytes']):>11s} "
              f"{gib(r['mem_ref_bytes']):>10s} {r['peak_over_ref']:8.2f}")
    if "total_s" in peer:
        ref = block_shapes(llama3_8b_config(1, a.tiny))
        refb = ref["block_bytes_bf16"] + ref["hessian_bytes"]
        print(f"{'llm-compressor ' + peer['version'] + ' ' + str(peer['layers']) + 'L':44s} {peer['total_s']:9.2f} "
              f"{peer['per_layer_s']:8.3f} {gib(peer['peak_bytes']):>11s} {gib(refb):>10s} "
              f"{peer['peak_bytes'] / refb:8.2f}")
        for r in rep["lowbit"]:
            sp = peer["per_layer_s"] / r["per_layer_s"]
            print(f"  speedup per layer, llm-compressor {peer['layers']}L / lowbit {r['layers']}L "
                  f"offload={r['offload_activations']} timers={r['phase_timers']}: {sp:.2f}x")
            r["speedup_per_layer_vs_peer"] = sp
        small = [r for r in rep["lowbit"] if r["layers"] == peer["layers"]]
        for r in small:
            r["speedup_total_vs_peer"] = peer["total_s"] / r["total_s"]
            print(f"  like-for-like total ({peer['layers']}L) offload={r['offload_activations']}: "
                  f"{peer['total_s']:.2f} / {r['total_s']:.2f} = {r['speedup_total_vs_peer']:.2f}x")
    for pk in rep["packing"]:
        print(f"packing {pk['layers']}L on {pk['device']}: {pk['seconds']:.2f} s measured "
              f"({pk['blocks_packed'] or pk['layers']} blocks), all layers ~ {pk['seconds_all_layers_est']:.2f} s")
    save()
    print(f"wall {rep['wall_s']:.1f} s; wrote {out / 'gptq_speed.json'}")


if __name__ == "__main__":
    main()
