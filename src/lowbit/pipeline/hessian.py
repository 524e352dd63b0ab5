"""The statistics GPTQ collects by hooks: ``H = 2/n X^T X`` of a linear's inputs, and, for
asymmetric calibration, ``D = 2/n (X_float - X)^T X`` beside it; phase timers for the bench
(synchronising ones, and a timeline that does not synchronise)."""

from __future__ import annotations

import time

import torch


class HessianObserver:
    """``H = 2/n sum_t x_t x_t^T`` over every token ``x_t (in,)`` seen, in float32.

    Tokens are summed unscaled (one fused ``S += X^T X`` per batch, no rescaling pass over the
    ``in x in`` buffer) and ``H`` scales the sum by ``2/n`` in place, once, when first read. Kept
    on ``device`` (the block's device, or the CPU to save accelerator memory). On CUDA, 16-bit
    activations are multiplied as they are with float32 accumulation (exact products, tensor-core
    speed); elsewhere they are upcast to float32 first.
    """

    def __init__(self, in_features: int, device: torch.device | str, timers: dict[str, float] | None = None,
                 cross: bool = False, keep_top: int = 0, panel_rows: int | None = None) -> None:
        self._S = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        # ``S`` is symmetric: with panels, only its lower block triangle is summed (row panel ``[r0, r1)``
        # times columns ``[0, r1)``; ``k(k+1)/2`` of ``k^2`` tiles: 57% of the products of a 14336-wide
        # down_proj in 2048-row panels) and mirrored once, when ``H`` is first read. None: 2048-row
        # panels on the fused CUDA path for inputs at least 4096 wide, else one panel (the full product).
        self.panel_rows = panel_rows
        self._panels: list[tuple[int, int]] | None = None
        # with ``keep_top`` = K: the K tokens of largest norm seen, ``top (K, in)`` float32 (massive
        # activations, attention sinks: what a mean-squared objective weighs least)
        self.keep_top = keep_top
        self.top = torch.zeros(0, in_features, dtype=torch.float32, device=device)
        # with ``cross``: also D = 2/n sum_t (x_float_t - x_t) x_t^T, paired with the float model's inputs
        self._C = torch.zeros_like(self._S) if cross else None
        self.n = 0
        self.timers = timers
        self._final = False

    def update(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        if self._final:
            raise RuntimeError("HessianObserver.update after H was read")
        t0 = tick(self.timers, self._S.device)
        x = x.detach().reshape(-1, x.shape[-1])
        self.n += x.shape[0]
        fused = x.device.type == "cuda" and self._S.device.type == "cuda" and x.dtype in (torch.bfloat16,
                                                                                          torch.float16)
        # the inputs on the device of _S (and _C): half precision for the fused products, else fp32
        xx = x.to(self._S.device) if fused else x.to(device=self._S.device, dtype=torch.float32)
        if self._C is not None:
            if x_float is None:
                raise ValueError("this observer accumulates D: pass the float model's inputs too")
            xf = x_float.detach().reshape(-1, x.shape[-1])
            if fused and xf.dtype == x.dtype:
                # the difference of two half-precision values is rounded relative to itself, so it keeps
                # its digits; products in half precision, sums in fp32 (as for H)
                dd = xf.to(self._C.device) - xx
                torch.addmm(self._C, dd.T, xx, out_dtype=torch.float32, out=self._C)
            else:
                xq = xx.float()
                self._C.addmm_((xf.to(device=self._C.device, dtype=torch.float32) - xq).T, xq)
        if self._panels is None:
            height = self.panel_rows or (PANEL_ROWS if fused and x.shape[-1] >= 2 * PANEL_ROWS else x.shape[-1])
            self._panels = _panels(x.shape[-1], height)
        for r0, r1 in self._panels:
            out = self._S[r0:r1, :r1]  # a row panel: unit column stride, row stride ``in`` (a cuBLAS ld)
            if fused:
                torch.addmm(out, xx[:, r0:r1].T, xx[:, :r1], out_dtype=torch.float32, out=out)
            else:
                out.addmm_(xx[:, r0:r1].T, xx[:, :r1])
        if self.keep_top:
            rows = x.to(device=self.top.device, dtype=torch.float32)
            rows = rows[rows.norm(dim=1).topk(min(self.keep_top, rows.shape[0])).indices]
            both = torch.cat([self.top, rows])
            self.top = both[both.norm(dim=1).topk(min(self.keep_top, both.shape[0])).indices]
        tock(self.timers, "hessian", t0, self._S.device)

    @property
    def H(self) -> torch.Tensor:
        """The Hessian (scaled in place on first read; no update after)."""
        if not self._final:
            for r0, r1 in (self._panels or [])[1:]:  # the upper block triangle from the lower one
                self._S[:r0, r0:r1].copy_(self._S[r0:r1, :r0].T)
            self._S.mul_(2.0 / max(self.n, 1))
            if self._C is not None:
                self._C.mul_(2.0 / max(self.n, 1))
            self._final = True
        return self._S

    @property
    def D(self) -> torch.Tensor | None:
        """``D = 2/n (X_float - X)^T X`` (scaled on first read, like ``H``), or None."""
        _ = self.H
        return self._C


PANEL_ROWS = 2048


def _panels(n: int, rows: int) -> list[tuple[int, int]]:
    """``[r0, r1)`` row panels covering ``[0, n)``, as many as ``rows`` fits, of near-equal sizes."""
    k = max(1, n // max(rows, 1))
    cuts = [round(i * n / k) for i in range(k + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def tick(timers: dict[str, float] | None, device: torch.device) -> float:
    if timers is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def tock(timers: dict[str, float] | None, key: str, t0: float, device: torch.device) -> None:
    """Add the seconds since ``t0`` to ``timers[key]``; on CUDA also the peak memory allocated since
    the previous tock to ``timers["peak:" + key]`` (the device's peak counter restarts here)."""
    if timers is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            pk = f"peak:{key}"
            timers[pk] = max(timers.get(pk, 0.0), float(torch.cuda.max_memory_allocated(device)))
            torch.cuda.reset_peak_memory_stats(device)
        timers[key] = timers.get(key, 0.0) + time.perf_counter() - t0


class Timeline:
    """Phase marks on the device's own clock, read once at the end: unlike :func:`tick` / :func:`tock`
    it never synchronises, so the run it times keeps its overlap of host and device work.

    ``mark(label)`` says the phase ``label`` starts now (a CUDA event recorded on the current stream,
    or the host clock on a CPU); :meth:`totals` gives the seconds from each mark to the next, summed
    by label. Time in a phase includes any idle time of the stream inside it.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, torch.cuda.Event | float]] = []

    def mark(self, label: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((label, ev))
        else:
            self.marks.append((label, time.perf_counter()))

    def phases(self) -> list[tuple[str, float]]:
        """(label, seconds) of every phase in order (a final mark closes the last phase)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: list[tuple[str, float]] = []
        for (label, a), (_, b) in zip(self.marks, self.marks[1:], strict=False):
            if isinstance(a, float) and isinstance(b, float):
                dt = b - a
            else:
                assert isinstance(a, torch.cuda.Event) and isinstance(b, torch.cuda.Event)
                dt = a.elapsed_time(b) / 1e3
            out.append((label, dt))
        return out

    def totals(self) -> dict[str, float]:
        """Seconds per label, summed over the run (the final mark's own label gets no time)."""
        out: dict[str, float] = {}
        for label, dt in self.phases():
            out[label] = out.get(label, 0.0) + dt
        return out

    def per_block(self) -> list[dict[str, float]]:
        """Seconds per label for each block: the phases split where the first label comes again."""
        blocks: list[dict[str, float]] = []
        phases = self.phases()
        for label, dt in phases:
            if not blocks or label == phases[0][0]:
                blocks.append({})
            blocks[-1][label] = blocks[-1].get(label, 0.0) + dt
        return blocks
