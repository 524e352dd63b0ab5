"""Replaying a block's attention from the saved inputs of its output projection.

A decoder block computes ``h = x + A(x)`` (then its MLP), where the attention module returns
``(o_proj(z), ...)`` with ``z = softmax(Q K^T / sqrt(d_h) + mask) V``, ``(1, T, heads * d_h)`` per
sample, and ``Q, K, V`` the projections of the normed ``x``. Once ``q/k/v`` hold their final
weights, ``z`` depends on nothing a later run of the block changes, yet each later run (GPTQ's
gate/up and down stages, GPTAQ's float run to the output, the engine's output pass) recomputes
it: the norm, the rotary embedding, the attention and the layouts, 0.68 ms of a 1.80 ms
Llama-3-8B block forward on an H200 (``bench/block_forward.py``), four times per block.

The run that first reaches ``o_proj`` with final ``q/k/v`` keeps its inputs (``save``: each
sample's ``z`` where that sample's block input lives, pinned host memory when activations are
offloaded); later runs replace the attention module's forward by ``o_proj(z_s)``. Hooks on
``o_proj`` still see every call. The architecture table names the pair (``ArchSpec.attn_out``);
the first replayed call of each source (quantized, float) per block also runs the real
attention and compares: anything but an identical output turns replay off for the block, with a
warning, so an architecture whose attention does more after ``o_proj`` costs speed, not results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lowbit.models.archs import ArchSpec
from lowbit.pipeline.transfer import to_home, uploads

log = logging.getLogger(__name__)
_warned: set[str] = set()


class AttnReplay:
    """The attention module of one block, its output projection, and their saved inputs per source."""

    def __init__(self, attn: nn.Module, proj: nn.Linear, name: str, arch: str = "") -> None:
        self.attn, self.proj, self.name, self.arch = attn, proj, name, arch
        self.saved: dict[str, list[torch.Tensor]] = {}  # source ("quantized" | "float") -> z per sample
        self.ok = True  # False once a check found the replay wrong for this block
        self.z: torch.Tensor | None = None  # the current sample's z, set by the run loop
        self.src = ""
        self._checked: set[str] = set()
        self._tail: tuple[Any, ...] | None = None  # the attention's outputs after the first (attn weights)
        self._orig: Callable[..., Any] | None = None

    def ready(self, src: str) -> bool:
        return self.ok and src in self.saved

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        assert self._orig is not None
        z = self.z
        if z is None or not self.ok:
            return self._orig(*args, **kwargs)
        if self.src not in self._checked:
            # the real attention (observers on o_proj see its input, as in any run), then the replay
            # with o_proj's hooks held back (they must not see this call twice); a hook that stops the
            # run leaves the check to the next call
            ref = self._orig(*args, **kwargs)
            hooks = dict(self.proj._forward_pre_hooks)
            self.proj._forward_pre_hooks.clear()
            try:
                mine = self.proj(z)
            finally:
                self.proj._forward_pre_hooks.update(hooks)
            self._checked.add(self.src)
            first = ref[0] if isinstance(ref, tuple) else ref
            self._tail = tuple(None for _ in ref[1:]) if isinstance(ref, tuple) else None
            if not torch.equal(first, mine):
                self.ok = False
                msg = (f"{self.name}: the attention's output is not its output projection of the saved inputs; "
                       "replaying it is off for this block (slower, same results)")
                (log.debug if self.arch in _warned else log.warning)(msg)
                _warned.add(self.arch)
            return ref
        out = self.proj(z)
        return out if self._tail is None else (out, *self._tail)

    @contextmanager
    def active(self) -> Iterator[AttnReplay]:
        """Within: the attention module replays ``self.z`` from source ``self.src`` (both set per call
        by the caller; ``z = None`` runs the real attention)."""
        own = self.attn.__dict__.get("forward")  # a forward set on the instance (kept, and restored)
        self._orig = self.attn.forward
        self.attn.forward = self._forward  # type: ignore[method-assign]
        try:
            yield self
        finally:
            if own is None:
                del self.attn.forward
            else:
                self.attn.forward = own  # type: ignore[method-assign]
            self.z, self._orig = None, None


def saved_inputs(replay: AttnReplay | None, src: str, n: int, device: torch.device
                 ) -> Iterator[torch.Tensor | None]:
    """The saved ``z`` of each of ``n`` samples from ``src``, uploaded to ``device`` one ahead
    (:func:`~lowbit.pipeline.transfer.uploads`), or ``None`` each when there are none to replay."""
    if replay is None or not replay.ready(src):
        return iter([None] * n)
    zs = replay.saved[src]
    if len(zs) != n:
        raise RuntimeError(f"{replay.name}: {len(zs)} saved attention inputs for {n} samples")
    return iter(uploads(zs, device))


@contextmanager
def maybe_active(replay: AttnReplay | None, *srcs: str) -> Iterator[AttnReplay | None]:
    """:meth:`AttnReplay.active` if any of ``srcs`` has saved inputs, else nothing (yields None)."""
    if replay is None or not any(replay.ready(s) for s in srcs):
        yield None
        return
    with replay.active() as r:
        yield r


def attn_replay(block: nn.Module, spec: ArchSpec, index: int) -> AttnReplay | None:
    """The replay of block ``index``'s attention, if the architecture table names its pair."""
    if spec.attn_out is None:
        return None
    attn_name, proj_name = spec.attn_out
    proj = block.get_submodule(proj_name)
    assert isinstance(proj, nn.Linear)
    return AttnReplay(block.get_submodule(attn_name), proj, f"{spec.blocks}.{index}.{attn_name}", spec.name)


@contextmanager
def saving_attn(rp: AttnReplay | None, inputs: list[torch.Tensor], device: torch.device, src: str, on: bool = True,
                active: Callable[[], bool] | None = None) -> Iterator[None]:
    """Within: a pre-hook (first of all) keeps each input of the attention's output projection, where
    the block ``inputs`` live (``device`` when there are none; while ``active()``, if given); on a clean
    exit with one per input they become the saved ``z`` of source ``src`` (a no-op unless ``on`` and
    the block has a replay ``rp``)."""
    if not on or rp is None:
        yield
        return
    saved: list[torch.Tensor] = []
    home = inputs[0].device if inputs else device

    def keep(m: nn.Module, args: tuple) -> None:
        if active is None or active():
            saved.append(to_home(args[0].detach(), home))

    h = rp.proj.register_forward_pre_hook(keep, prepend=True)
    try:
        yield
    finally:
        h.remove()
    if len(saved) == len(inputs):
        rp.saved[src] = saved
