"""Launch configurations of the Triton W4A16 / W8A16 kernels: defaults, candidates, tuning.

A configuration is picked per (GPU, bits, N, K, M bucket). Order of preference:
1. a configuration timed in this process (:func:`tune`, run by :func:`lowbit.core.kernels.warm_up`
   or the benchmark, outside CUDA-graph capture);
2. one shipped in ``tuned/*.json`` for this GPU's name (``bench/kernels_speed.py`` writes them;
   ``tuned/h100.json``: the Llama-3-8B shapes on an H100 SXM);
3. the heuristic :func:`default_config`: 32 rows a program, split-K until there are about six
   programs a multiprocessor for one row (three for GEMM tiles), as the H100 tuning mostly chose.

``M`` buckets: 1 (GEMV, CUDA cores), then powers of two up to 64, then 128+ (GEMM, tensor cores).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class GemvConfig:
    bn: int = 16  # output rows a program
    u: int = 2  # tiles (32 words of a row each) a loop step
    split: int = 1  # programs along K
    warps: int = 4
    stages: int = 1


@dataclass(frozen=True)
class GemmConfig:
    bm: int = 16
    bn: int = 64
    split: int = 1
    warps: int = 4
    stages: int = 2


Config = GemvConfig | GemmConfig
_TUNED: dict[tuple, Config] = {}
_SHIPPED: dict[tuple, Config] = {}
SHIPPED_DIR = Path(__file__).with_name("tuned")


def m_bucket(m: int) -> int:
    """1, 2, 4, ..., 64, then 128 for every larger M."""
    return 1 if m <= 1 else min(1 << (m - 1).bit_length(), 128)


@functools.cache
def sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _splits_for(programs: int, tiles: int, target: int) -> int:
    """Smallest power of two ``s`` with ``programs * s >= target`` (at most ``tiles / 2``, at least 1)."""
    s = 1
    while programs * s < target and s * 2 <= max(1, tiles // 2):
        s *= 2
    return s


def default_config(m: int, n: int, k: int, bits: int, sms: int) -> Config:
    tiles = -(-k // ((32 // bits) * 32))
    if m <= 1:
        bn = 32
        return GemvConfig(bn=bn, u=1, split=_splits_for(-(-n // bn), tiles, 6 * sms), warps=4)
    bm = 16 if m <= 64 else 64
    bn = 32 if m <= 64 else 128
    progs = -(-n // bn) * -(-m // bm)
    split = _splits_for(progs, tiles, 3 * sms) if m <= 64 else 1
    return GemmConfig(bm=bm, bn=bn, split=split, warps=4 if bm * bn <= 4096 else 8, stages=2)


def candidates(m: int, n: int, k: int, bits: int, sms: int) -> list[Config]:
    """The configurations :func:`tune` times for one (M bucket, N, K, bits)."""
    tiles = -(-k // ((32 // bits) * 32))
    out: list[Config] = []
    if m <= 1:
        for bn, u in ((32, 1), (32, 2), (64, 1), (64, 2)):
            s0 = _splits_for(-(-n // bn), tiles, 2 * sms)
            for split in sorted({max(1, s0 // 2), s0, min(s0 * 2, max(1, tiles // 2))}):
                out.append(GemvConfig(bn=bn, u=u, split=split, warps=4))
        return out
    for bm in sorted({16, max(16, min(64, m_bucket(m)))}):
        for bn, warps, stages in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2)):
            progs = -(-n // bn) * -(-m // bm)
            s0 = _splits_for(progs, tiles, 2 * sms) if m <= 64 else 1
            for split in sorted({s0, min(s0 * 2, max(1, tiles // 2))} if m <= 64 else {1}):
                out.append(GemmConfig(bm=bm, bn=bn, split=split, warps=warps, stages=stages))
    return out


def _key(device: torch.device, m: int, n: int, k: int, bits: int, gs_class: str) -> tuple:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (name, bits, gs_class, n, k, m_bucket(m))


def pick(device: torch.device, m: int, n: int, k: int, bits: int, gs_class: str) -> Config:
    key = _key(device, m, n, k, bits, gs_class)
    hit = _TUNED.get(key) or _shipped().get(key)
    if hit is not None:
        return hit
    sms = sm_count(device.index or 0) if device.type == "cuda" else 4
    return default_config(m, n, k, bits, sms)


def tune(device: torch.device, m: int, n: int, k: int, bits: int, gs_class: str,
         run: Callable[[Config], None], timer: Callable[[Callable[[], None]], float]) -> tuple[Config, float]:
    """Time every candidate with ``timer(lambda: run(cfg))`` (seconds); remember and return the fastest."""
    sms = sm_count(device.index or 0) if device.type == "cuda" else 4
    best: tuple[Config, float] | None = None
    for cfg in candidates(m, n, k, bits, sms):
        t = timer(functools.partial(run, cfg))
        if best is None or t < best[1]:
            best = (cfg, t)
    assert best is not None
    _TUNED[_key(device, m, n, k, bits, gs_class)] = best[0]
    return best


def set_config(device: torch.device, m: int, n: int, k: int, bits: int, gs_class: str, cfg: Config) -> None:
    """Force the configuration of one (device, M bucket, N, K, bits) key."""
    _TUNED[_key(device, m, n, k, bits, gs_class)] = cfg


def has(device: torch.device, m: int, n: int, k: int, bits: int, gs_class: str) -> bool:
    return _key(device, m, n, k, bits, gs_class) in _TUNED


@functools.cache
def _shipped() -> dict[tuple, Config]:
    for f in sorted(SHIPPED_DIR.glob("*.json")):
        _SHIPPED.update(_read(f))
    return _SHIPPED


def _read(path: str | Path) -> dict[tuple, Config]:
    with open(path) as f:
        rows = json.load(f)
    return {tuple(r["key"]): (GemvConfig if r["kind"] == "gemv" else GemmConfig)(**r["config"]) for r in rows}


def save(path: str) -> None:
    """Write every tuned configuration (all devices) as JSON."""
    rows = [{"key": list(k), "kind": "gemv" if isinstance(c, GemvConfig) else "gemm", "config": asdict(c)}
            for k, c in _TUNED.items()]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def load(path: str) -> int:
    """Read configurations written by :func:`save` (they take precedence); returns how many were read."""
    got = _read(path)
    _TUNED.update(got)
    return len(got)
