"""Host <-> device traffic of the block engine, kept off the critical path.

Three costs dominate a naive block loop on a GPU, none of them arithmetic:

* ``module.to("cpu")`` allocates fresh pageable host memory for every parameter, and the copy
  into never-touched pages runs at page-fault speed (about 1 GB/s measured on an H100 host);
* copying results (codes, scales) to the host does the same and blocks the Python thread;
* activations offloaded to pinned memory are uploaded on the compute stream, one sample at a
  time, so the GPU idles during every upload.

Here parameters go back into the host tensors they came from (already-faulted pages; unchanged
ones are not copied at all), device-to-host copies run on a side stream in one background thread
while the GPU works on the next block, and the next sample is uploaded on a side stream while the
current one computes. :meth:`HostCopier.wait` joins everything before the host reads the results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn


class HostCopier:
    """Runs device-to-host copies in one background thread, on its own CUDA stream.

    A job waits for the work queued so far on the caller's stream (an event), then copies. The
    job's closure holds the device tensors, so their memory is not reused before the copy ends.
    On the CPU every job runs at once, inline.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowbit-d2h") if self.cuda else None
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._jobs: list[Future[Any]] = []

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        if self._pool is None:
            f: Future[Any] = Future()
            f.set_result(fn())
            return f
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        stream = self._stream
        assert stream is not None

        def job() -> Any:
            with torch.cuda.stream(stream):
                stream.wait_event(ev)
                out = fn()
            stream.synchronize()
            return out

        fut = self._pool.submit(job)
        self._jobs.append(fut)
        return fut

    def wait(self) -> None:
        """Block until every submitted copy is done (re-raising a failed one)."""
        jobs, self._jobs = self._jobs, []
        for f in jobs:
            f.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def to_host_async(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied to pinned host memory without blocking (CUDA tensors; others are returned as
    they are). The copy is queued on the current stream: the device tensor may be freed at once
    (the allocator reuses it only after the copy), and the host must not read the result before
    that stream is synchronised (``HostCopier.wait`` does, for results stored through it)."""
    if t.device.type != "cuda":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


_COPY_OUT: dict[torch.device, torch.cuda.Stream] = {}


def _norm(device: torch.device) -> torch.device:
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _copy_out_stream(device: torch.device) -> torch.cuda.Stream:
    device = _norm(device)
    if device not in _COPY_OUT:
        _COPY_OUT[device] = torch.cuda.Stream(device)
    return _COPY_OUT[device]


def to_host_pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a CUDA tensor) copied into new pinned host memory on the device's copy-out stream,
    after the work queued so far on the current stream: the copy overlaps the next computation
    instead of holding it up (16 MiB, ~0.3 ms, per 2048-token sample of a 4096-wide model).

    Ordering: :func:`uploads` waits for the copy-out stream before its first upload, and
    :func:`copies_done` makes the host wait for it; read the result on the host only after that.
    """
    main = torch.cuda.current_stream(t.device)
    side = _copy_out_stream(t.device)
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out.copy_(t, non_blocking=True)
    t.record_stream(side)  # t's memory is not reused before the copy has read it
    return out


def to_home(t: torch.Tensor, home: torch.device) -> torch.Tensor:
    """``t`` moved to ``home``; CPU copies of CUDA tensors go to pinned memory, asynchronously, on
    a copy-out stream (:func:`uploads` orders after it; the engine waits for it before each block)."""
    if t.device == home:
        return t
    if home.type == "cpu" and t.device.type == "cuda":
        return to_host_pinned(t)
    return t.to(home)


def copies_done(device: torch.device) -> None:
    """Block the host until every :func:`to_host_pinned` copy from ``device`` has landed."""
    if device.type == "cuda" and _norm(device) in _COPY_OUT:
        _COPY_OUT[_norm(device)].synchronize()


def prewarm_pinned(shape: tuple[int, ...], dtype: torch.dtype, count: int) -> threading.Thread | None:
    """Pin ``count`` host tensors of ``shape`` in a background thread, then free them: torch's caching
    host allocator keeps the memory, and the engine's later copies to the host (block outputs, saved
    attention inputs) reuse it instead of pinning fresh pages on the critical path (0.19 s per GiB on
    an H200 host with :mod:`lowbit.cudaenv`'s settings: about 1.5 s in block 0 of a GPTQ run of an 8B
    model, which holds six sets of activations). Returns the thread (None when there is nothing to do)."""
    if count <= 0 or not torch.cuda.is_available():
        return None

    def pin() -> None:
        try:
            held = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(count)]
            del held
        except RuntimeError:  # out of pinnable memory: the engine allocates as it goes
            pass

    t = threading.Thread(target=pin, name="lowbit-pin", daemon=True)
    t.start()
    return t


def stage(module: nn.Module) -> dict[str, torch.Tensor]:
    """Pinned copies of ``module``'s host parameters and buffers, for a fast upload later (a host
    memcpy; run it in the background while the device works on the previous block)."""
    return {name: torch.empty_like(t, pin_memory=True).copy_(t) for name, t in _tensors(module)
            if t.device.type == "cpu"}


def onload(module: nn.Module, device: torch.device, staged: dict[str, torch.Tensor] | None = None
           ) -> dict[str, torch.Tensor]:
    """Move ``module``'s parameters and buffers to ``device`` (from their pinned ``staged`` copies
    when given: a DMA at full bus speed instead of a pageable copy); returns their host tensors."""
    homes: dict[str, torch.Tensor] = {}
    if device.type == "cpu":
        return homes
    for name, t in _tensors(module):
        homes[name] = t.data
        src = staged.get(name, t.data) if staged else t.data
        t.data = src.to(device, non_blocking=True)
    return homes


def offload(module: nn.Module, homes: dict[str, torch.Tensor], copier: HostCopier) -> None:
    """Point ``module`` back at its host tensors, the device values copied into their parameters
    by ``copier`` (in the background; join with ``copier.wait()``). Buffers are not copied back.

    Each copy goes through a pinned staging buffer (full-speed DMA, then a host memcpy into the
    original, already-mapped pages).
    """
    if not homes:
        return
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    params = {id(p) for p in module.parameters()}
    for name, t in _tensors(module):
        if id(t) in params:
            pending.append((homes[name], t.data))
        t.data = homes[name]

    def copy() -> None:
        for h, d in pending:
            st = torch.empty_like(h, pin_memory=True)
            st.copy_(d)
            h.copy_(st)

    copier.submit(copy)


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def uploads(xs: list[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """``x.to(device)`` for each ``x`` in ``xs``, the next one uploaded on a side stream while the
    caller computes on the current one (pinned host tensors only; otherwise plain copies)."""
    if device.type != "cuda" or not xs or xs[0].device.type != "cpu" or not xs[0].is_pinned():
        for x in xs:
            yield x.to(device, non_blocking=True)
        return
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)  # host tensors written by copies queued before (outputs of the previous run)
    if _norm(device) in _COPY_OUT:
        side.wait_stream(_COPY_OUT[_norm(device)])

    def start(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(side):
            y = x.to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(side)
        return y, ev

    nxt = start(xs[0])
    for k in range(len(xs)):
        y, ev = nxt
        if k + 1 < len(xs):
            nxt = start(xs[k + 1])
        main.wait_event(ev)
        y.record_stream(main)  # allocated on the side stream, used (and freed) on the main one
        yield y
