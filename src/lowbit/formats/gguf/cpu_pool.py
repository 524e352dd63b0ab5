"""Running the numpy encoders over chunks of rows on the CPU cores.

Two costs decide the design. The encoders issue many short numpy calls per chunk (chunks are sized to
stay in cache), and Python threads serialise on the GIL between such calls; and every chunk allocates
temporaries of 0.1-2 MB, which glibc maps fresh (and the kernel zero-fills page by page) unless its
mmap / trim thresholds are raised, which doubles the time of a search. So on Linux a tensor of at least
``POOL_MIN_VALUES`` values is encoded by a small pool of forked worker processes (the pattern of torch's
DataLoader workers: fork, one torch thread per worker), whose malloc keeps its memory; the rows and the
result go through two scratch files in ``/dev/shm`` that live as long as the process (their pages are
allocated once), so only row ranges travel to the workers. The calling process's own malloc settings
are left alone. Small tensors, and systems without ``fork`` (macOS, Windows), run in the calling process,
on threads for more than one worker.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

Encoder = Callable[[Any, Any], Any]  # (rows (r, n) float32, qw (n,) | None) -> uint8 (r, bytes_per_row)

POOL_MIN_VALUES = 1 << 20  # below this the pool's fixed cost (copying the rows, task round trips) dominates
SCRATCH_BYTES = 256 << 20  # rows go through the scratch file in slices of at most this much (it is RAM in /dev/shm)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

_POOLS: dict[int, ProcessPoolExecutor] = {}  # by number of workers
_SCRATCH: str | None = None  # directory of the scratch files rows.f32 / out.u8
_MAPS: dict[str, np.memmap] = {}  # path -> a mapping of the whole file, kept: mapping pages costs a fault each
_LOCK = threading.Lock()  # one process-pool run at a time (they share the scratch files)


def _init_worker() -> None:
    """A worker: one torch thread; malloc keeps freed memory (no fresh, zero-filled pages per temporary)."""
    torch.set_num_threads(1)
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc: keep the defaults
        pass


def _encode(encoder: Encoder, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    with np.errstate(all="ignore"):  # inf / NaN intermediates of degenerate blocks are part of the port
        return encoder(x, qw)


def _mapped(path: str, dtype: type, shape: tuple[int, int]) -> np.ndarray:
    """An array of ``shape`` at the start of scratch file ``path``, through a cached mapping of the file."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    m = _MAPS.get(path)
    if m is None or m.size < nbytes:
        m = _MAPS[path] = np.memmap(path, np.uint8, "r+", shape=(os.path.getsize(path),))
    return m[:nbytes].view(dtype).reshape(shape)


def _encode_rows(encoder: Encoder, src: str, shape: tuple[int, int], dst: str, out_shape: tuple[int, int],
                 r0: int, r1: int, step: int, qw: np.ndarray | None) -> None:
    """Worker: rows ``r0:r1`` of the float32 file ``src``, ``step`` rows at a time, into the uint8 file ``dst``."""
    x, y = _mapped(src, np.float32, shape), _mapped(dst, np.uint8, out_shape)
    for r in range(r0, r1, step):
        e = min(r + step, r1)
        y[r:e] = _encode(encoder, np.array(x[r:e]), qw)


def _shutdown() -> None:
    global _SCRATCH
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()
    if _SCRATCH is not None:
        _MAPS.clear()
        shutil.rmtree(_SCRATCH, ignore_errors=True)
        _SCRATCH = None


atexit.register(_shutdown)


def _scratch(name: str, nbytes: int) -> str:
    """Path of scratch file ``name``, at least ``nbytes`` long (grown, never shrunk)."""
    global _SCRATCH
    if _SCRATCH is None:  # /dev/shm (RAM) when it has room; containers often give it only 64 MB
        shm = "/dev/shm"
        room = os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize if os.path.isdir(shm) else 0
        _SCRATCH = tempfile.mkdtemp(prefix="lowbit-gguf-", dir=shm if room >= 2 * SCRATCH_BYTES else None)
    path = os.path.join(_SCRATCH, name)
    with open(path, "ab") as f:
        if f.tell() < nbytes:
            f.truncate(nbytes)
    return path


def process_pool(workers: int) -> ProcessPoolExecutor | None:
    """The shared pool of ``workers`` forked processes (created on first use), or None without ``fork``."""
    if not sys.platform.startswith("linux"):
        return None
    if workers not in _POOLS:
        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                              initializer=_init_worker)
    return _POOLS[workers]


def _run_in_pool(pool: ProcessPoolExecutor, encoder: Encoder, data: np.ndarray, qw: np.ndarray | None,
                 out: np.ndarray, step: int, workers: int) -> None:
    with _LOCK:
        src, dst = _scratch("rows.f32", data.nbytes), _scratch("out.u8", out.nbytes)
        rows, result = _mapped(src, np.float32, data.shape), _mapped(dst, np.uint8, out.shape)
        # a few tasks per worker (load balance), each a run of cache-sized chunks; the workers start on the
        # first task while the rows of the next ones are still being copied
        n = data.shape[0]
        n_chunks = -(-n // step)
        bounds = [min(n, step * (k * n_chunks // (4 * workers))) for k in range(4 * workers + 1)]
        tasks = []
        for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
            if r1 <= r0:
                continue
            rows[r0:r1] = data[r0:r1]
            tasks.append((r0, r1, pool.submit(_encode_rows, encoder, src, data.shape, dst, out.shape, r0, r1, step,
                                              qw)))
        for r0, r1, fut in tasks:
            fut.result()
            out[r0:r1] = result[r0:r1]


def run_chunks(encoder: Encoder, data: np.ndarray, qw: np.ndarray | None, out: np.ndarray, step: int,
               workers: int, pool_min_values: int = POOL_MIN_VALUES) -> None:
    """``out[r:r+step] = encoder(data[r:r+step], qw)`` for every chunk of ``step`` rows, on ``workers`` cores.

    Through the process pool for tensors of at least ``pool_min_values`` values (on Linux); otherwise in
    this process, on threads only where there is no pool (their GIL hand-offs cost more than they gain
    when the pool is an option)."""
    starts = range(0, data.shape[0], step)
    workers = max(1, workers)
    pool = process_pool(workers) if data.size >= pool_min_values else None
    if pool is not None:
        rows = max(step, SCRATCH_BYTES // data[0].nbytes // step * step)
        for r0 in range(0, data.shape[0], rows):
            _run_in_pool(pool, encoder, data[r0:r0 + rows], qw, out[r0:r0 + rows], step, workers)
        return
    threads = 1 if sys.platform.startswith("linux") else min(workers, len(starts))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the few torch reductions on numpy memory: one thread per worker
    try:
        if threads > 1:
            with ThreadPoolExecutor(threads) as tpool:
                results = tpool.map(lambda r: _encode(encoder, data[r:r + step], qw), starts)
                for r0, res in zip(starts, results, strict=True):
                    out[r0:r0 + step] = res
        else:
            for r0 in starts:
                out[r0:r0 + step] = _encode(encoder, data[r0:r0 + step], qw)
    finally:
        torch.set_num_threads(torch_threads)
