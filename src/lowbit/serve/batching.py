"""Continuous batching of generation requests for any model ``lowbit.load`` returns.

One worker thread owns the model. Each step it

1. admits waiting requests (up to ``max_batch`` rows): their prompts are prefilled together, left-padded
   to one length, and their KV cache is merged into the running batch's (the shorter of the two is
   left-padded with masked zeros, so every row keeps its own positions);
2. decodes one token for every running row: ``input_ids (B, 1)``, ``attention_mask (B, L + 1)``,
   ``position_ids (B, 1)`` = each row's own length;
3. samples per row (greedy at temperature 0, else softmax(logits / T) cut to the top-p mass, with the
   request's own generator), detokenizes, checks EOS / stop strings / ``max_tokens`` / a cancelled client,
   and drops finished rows from the cache (``batch_select_indices``).

Rows join between steps, so a request that arrives while others stream waits at most one step. A cache
whose layers are not plain :class:`transformers.DynamicLayer` (sliding windows, e.g. Gemma 3) cannot be
merged: new requests then wait until the running batch empties (waves). Every event goes back through
the request's ``emit`` callback (thread-safe on the caller's side). An exception in a step fails the rows
of that step with its message and the worker goes on serving.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.core.errors import LowbitError

log = logging.getLogger(__name__)


@dataclass
class Event:
    """What a request hears: ``kind`` is ``text`` (``text`` delta), ``done`` (``finish`` reason, ``usage``)
    or ``error`` (``text`` = the message)."""

    kind: str
    text: str = ""
    finish: str | None = None
    usage: dict[str, int] | None = None


@dataclass
class GenRequest:
    """One generation: prompt token ids, limits and sampling; ``emit`` receives each :class:`Event`."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    gen: torch.Generator | None = None


class QueueFull(LowbitError):
    """The server's queue of waiting requests is full."""


class BatchEngine:
    """The worker: ``submit`` requests from any thread; ``start``/``stop`` the worker."""

    def __init__(self, model: Any, tokenizer: Any, ctx: int, max_batch: int = 64, max_queue: int = 1024,
                 device: str | torch.device = "cpu", admit_wait_s: float = 0.01) -> None:
        self.model, self.tok, self.ctx = model, tokenizer, ctx
        self.max_batch, self.device, self.admit_wait_s = max_batch, torch.device(device), admit_wait_s
        self.waiting: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self.rows: list[GenRequest] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token
        self.pos = torch.zeros(0, dtype=torch.long)  # (B,) next position of each row
        self.last = torch.zeros(0, dtype=torch.long)  # (B,) the token each row feeds next
        self.eos = _eos_ids(model, tokenizer)
        # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns on every call)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- public ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lowbit-batch-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, req: GenRequest) -> None:
        """Queue ``req``; :class:`QueueFull` when ``max_queue`` requests already wait."""
        if req.seed is not None:
            req.gen = torch.Generator().manual_seed(req.seed)
        try:
            self.waiting.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting; retry later") from None

    @property
    def load(self) -> tuple[int, int]:
        """(running rows, waiting requests)."""
        return len(self.rows), self.waiting.qsize()

    # -- the loop ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                new = self._take()
                if new:
                    self._run(new, self._admit)
                if self.rows:
                    self._run(list(self.rows), lambda _: self._decode())
            except Exception:  # noqa: BLE001 -- the worker must outlive any one step
                log.exception("batch engine step failed")

    def _run(self, reqs: list[GenRequest], step: Callable[[list[GenRequest]], None]) -> None:
        """One step; on failure every request in it gets an error event and the batch starts afresh."""
        try:
            with torch.inference_mode():
                step(reqs)
        except Exception as e:  # noqa: BLE001 -- reported to the clients, the server goes on
            log.exception("generation step failed")
            for r in set(reqs) | set(self.rows):
                r.emit(Event("error", f"generation failed: {type(e).__name__}: {e}"))
            self._reset()

    def _take(self) -> list[GenRequest]:
        """Waiting requests to admit now: none while the running cache cannot take rows in."""
        room = self.max_batch - len(self.rows)
        if room <= 0 or (self.rows and not _mergeable(self.cache)):
            return []
        out: list[GenRequest] = []
        try:
            first = self.waiting.get(timeout=0.05) if not self.rows else self.waiting.get_nowait()
        except queue.Empty:
            return []
        out.append(first)
        if not self.rows:  # an idle server: let a burst of arrivals land together
            deadline = time.monotonic() + self.admit_wait_s
            while len(out) < room and (left := deadline - time.monotonic()) > 0:
                try:
                    out.append(self.waiting.get(timeout=left))
                except queue.Empty:
                    break
        while len(out) < room:
            try:
                out.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return [r for r in out if not r.cancelled.is_set()]

    def _reset(self) -> None:
        self.rows, self.cache, self.mask = [], None, None
        self.pos = self.last = torch.zeros(0, dtype=torch.long)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), use_cache=True, **{self.cache_arg: cache})
        return out.logits[:, -1, :].float().cpu()

    def _admit(self, new: list[GenRequest]) -> None:
        """Prefill ``new`` (left-padded to one length) and merge them into the running batch."""
        from transformers import DynamicCache

        n = max(len(r.prompt) for r in new)
        ids = torch.zeros(len(new), n, dtype=torch.long)
        mask = torch.zeros(len(new), n, dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, n - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, n - len(r.prompt):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        logits = self._forward(ids, mask, pos, cache)
        plen = torch.tensor([len(r.prompt) for r in new])
        if self.rows and self.mask is not None:
            self.cache, self.mask = _merge(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask = cache, mask
        self.rows += new
        self.pos = torch.cat([self.pos, plen])
        self.last = torch.cat([self.last, torch.zeros(len(new), dtype=torch.long)])
        self._advance(new, logits, offset=len(self.rows) - len(new))

    def _decode(self) -> None:
        assert self.mask is not None
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], 1)
        logits = self._forward(self.last[:, None], self.mask, self.pos[:, None], self.cache)
        self.pos = self.pos + 1
        self.steps += 1
        self._advance(list(self.rows), logits, offset=0)

    def _advance(self, reqs: list[GenRequest], logits: torch.Tensor, offset: int) -> None:
        """Sample one token for each of ``reqs`` (rows ``offset`` on), emit, and drop finished rows."""
        for j, r in enumerate(reqs):
            tok = _sample(logits[j], r)
            self.last[offset + j] = tok
            r.generated.append(tok)
        stepped = {id(r) for r in reqs}
        keep = [i for i, r in enumerate(self.rows)
                if not (self._emit(r) if id(r) in stepped else r.cancelled.is_set())]
        if len(keep) < len(self.rows):
            idx = torch.tensor(keep, dtype=torch.long)
            self.rows = [self.rows[i] for i in keep]
            if not self.rows:
                self._reset()
                return
            self.cache.batch_select_indices(idx.to(self.device))
            assert self.mask is not None
            self.mask, self.pos, self.last = self.mask[idx], self.pos[idx], self.last[idx]
            if _mergeable(self.cache):  # plain layers: drop the left padding no row needs any more
                self.mask, trim = _trim(self.mask)
                _crop_left(self.cache, trim)

    def _emit(self, r: GenRequest) -> bool:
        """Send ``r``'s new text; True when it is finished (the event then says why)."""
        if r.cancelled.is_set():
            return True
        tok = r.generated[-1]
        finish = "stop" if tok in self.eos else "length" if len(r.generated) >= r.max_tokens else None
        if finish is None and len(r.prompt) + len(r.generated) >= self.ctx:
            finish = "length"
        ids = r.generated[:-1] if tok in self.eos else r.generated
        text = self.tok.decode(ids, skip_special_tokens=True)
        for s in r.stop:
            at = text.find(s, max(0, r.sent - len(s)))
            if at >= 0:
                text, finish = text[:at], "stop"
        hold = 0 if finish else max((len(s) - 1 for s in r.stop), default=0)
        end = len(text) - hold
        if finish is None and text.endswith("\ufffd"):  # half of a multi-byte character
            end = min(end, len(text) - 1)
        if end > r.sent:
            r.emit(Event("text", text[r.sent:end]))
            r.sent = end
        if finish:
            r.emit(Event("done", finish=finish, usage={
                "prompt_tokens": len(r.prompt), "completion_tokens": len(r.generated),
                "total_tokens": len(r.prompt) + len(r.generated)}))
        return finish is not None


def _sample(logits: torch.Tensor, r: GenRequest) -> int:
    """Greedy at temperature 0; else a draw from softmax(logits / T) cut to the smallest top-p set."""
    if r.temperature <= 0:
        return int(torch.argmax(logits))
    p = torch.softmax(logits / r.temperature, -1)
    if r.top_p < 1.0:
        sp, si = torch.sort(p, descending=True)
        cut = (sp.cumsum(0) - sp) >= r.top_p  # tokens whose predecessors already hold top_p of the mass
        sp[cut] = 0
        p = torch.zeros_like(p).scatter_(0, si, sp)
    return int(torch.multinomial(p, 1, generator=r.gen))


def _eos_ids(model: Any, tok: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None)
        ids |= set(e) if isinstance(e, (list, tuple)) else {e} if isinstance(e, int) else set()
    if isinstance(getattr(tok, "eos_token_id", None), int):
        ids.add(tok.eos_token_id)
    return ids


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def _mergeable(cache: Any) -> bool:
    """Whether rows can join ``cache``: every layer a plain DynamicLayer (keys ``(B, H, L, D)``)."""
    from transformers.cache_utils import DynamicLayer

    return cache is not None and all(type(la) is DynamicLayer for la in _layers(cache))


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t (B, H, L, D)`` with ``n`` zero positions before the first."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[3]), t], dim=2)


def _merge(a: Any, ma: torch.Tensor, b: Any, mb: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Cache ``a`` (mask ``ma (Ba, La)``) with ``b``'s rows appended; the shorter is left-padded, masked out."""
    la, lb = ma.shape[1], mb.shape[1]
    n = max(la, lb)
    for x, y in zip(_layers(a), _layers(b), strict=True):
        if not getattr(y, "is_initialized", False):
            continue
        x.keys = torch.cat([_pad_left(x.keys, n - la), _pad_left(y.keys, n - lb)], 0)
        x.values = torch.cat([_pad_left(x.values, n - la), _pad_left(y.values, n - lb)], 0)
    pad = [torch.cat([m.new_zeros(m.shape[0], n - m.shape[1]), m], 1) for m in (ma, mb)]
    return a, torch.cat(pad, 0)


def _trim(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Drop leading columns no row uses (left padding of rows that left); returns the count."""
    used = mask.any(0).nonzero()
    first = int(used[0]) if used.numel() else 0
    return mask[:, first:], first


def _crop_left(cache: Any, n: int) -> None:
    if n == 0:
        return
    for la in _layers(cache):
        if getattr(la, "is_initialized", False) and la.keys is not None and la.keys.numel():
            la.keys, la.values = la.keys[:, :, n:], la.values[:, :, n:]
