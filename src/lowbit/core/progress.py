"""Progress of long loops: a rich bar on a terminal, plain log lines with an ETA everywhere else.

A run under nohup, slurm or CI writes to a file: a bar would be invisible there and the job would
look hung for minutes. :func:`progress` then logs ``label: i/n (x%), elapsed, ETA`` at most every
``every`` seconds (and at the end), through the ``lowbit.progress`` logger.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("lowbit.progress")


def _fmt(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Ticker:
    """``advance()`` once per step; a bar or periodic plain lines (see the module docstring)."""

    def __init__(self, label: str, total: int, enabled: bool, every: float) -> None:
        self.label, self.total, self.every = label, total, every
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        self.task = None
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                "{task.total}"), TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.advance(self.task, n)  # type: ignore[arg-type]
            return
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            el = now - self.t0
            eta = el / self.done * (self.total - self.done) if self.done else 0.0
            log.info("%s: %d/%d (%.0f%%), %s elapsed, ETA %s", self.label, self.done, self.total,
                     100 * self.done / self.total, _fmt(el), _fmt(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def progress(label: str, total: int, enabled: bool = True, every: float = 30.0) -> Iterator[Ticker]:
    """A :class:`Ticker` for ``total`` steps (nothing shown when not ``enabled``)."""
    t = Ticker(label, total, enabled, every)
    try:
        yield t
    finally:
        t.close()
