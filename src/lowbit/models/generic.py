"""An architecture table for a decoder-only model that no table names, derived by observing the model.

* **Blocks**: the ``nn.ModuleList`` holding the most parameters whose entries are modules (not linears)
  that each hold at least one ``nn.Linear`` -- ``model.layers``, ``transformer.h``, ``gpt_neox.layers``
  ... alike. Every block must hold the same linears (by name) as block 0.
* **Groups**: one forward of :data:`PROBE_TOKENS` tokens through the embeddings and block 0 (the rest of
  the model does not run), with a pre-hook on each of block 0's linears. Linears that receive the same
  input tensor -- the same storage, shape and strides, on every call -- form one group: that input's
  Hessian serves them all (GPTQ), and quantizing a group cannot change its own input. The hooks hold the
  tensors they see, so no storage is reused within the probe and sharing memory means sharing values.
  Groups are ordered by the first call of their first linear (execution order); a linear that does not
  run in that forward (a branch the probe did not take) is an error, never a silently float layer.
* **prev**: the innermost module of block 0 with weights of its own whose output is that same tensor (a
  norm, typically), or ``""`` (the block's input, a value computed inline such as ``act(gate) * up``, or
  the output of a weightless module such as an activation). It is shown to the
  user, never folded into: a module whose output feeds the group may also feed something that is not a
  linear (a residual taken after the norm), which a folded scale would change. So a derived table has
  every group ``foldable=False``, and AWQ / SmoothQuant ask for a real table entry.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import UnsupportedArchitectureError
from lowbit.models.archspec import ArchSpec, LinearGroup

log = logging.getLogger(__name__)

PROBE_TOKENS = 8
# preferred on a tie of parameter counts (never met in practice; documents where blocks usually are)
COMMON_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                      "transformer.blocks", "model.language_model.layers")

TensorKey = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype, str]


class _StopProbe(Exception):
    """Raised after block 0 has run: the probe needs nothing beyond it."""


def _cannot(name: str, why: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"no architecture table entry for {name!r}, and the generic fallback cannot derive one: {why}. Add an "
        f"ArchSpec for {name!r} to lowbit.models.archs.ARCHS (blocks path, linear groups in execution order, the "
        "module feeding each group).")


def _holds_linear(mod: nn.Module) -> bool:
    return not isinstance(mod, nn.Linear) and any(isinstance(m, nn.Linear) for m in mod.modules())


def find_blocks(model: nn.Module, name: str) -> str:
    """Path of the decoder blocks: the largest ``ModuleList`` of linear-holding modules."""
    best: tuple[tuple[int, bool], str] | None = None
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(_holds_linear(b) for b in mod):
            key = (sum(p.numel() for p in mod.parameters()), path in COMMON_BLOCK_PATHS)
            if best is None or key > best[0]:
                best = (key, path)
    if best is None:
        raise _cannot(name, "the model has no ModuleList of decoder blocks holding nn.Linear layers")
    return best[1]


def _key(t: torch.Tensor) -> TensorKey:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def probe_block(model: nn.Module, block: nn.Module, name: str
                ) -> tuple[list[str], dict[str, list[TensorKey]], dict[TensorKey, str]]:
    """One forward of :data:`PROBE_TOKENS` tokens, stopped after ``block``: its linears in the order they
    first ran, the input key of each call of each, and the producer of each output key (innermost first)."""
    order: list[str] = []
    calls: dict[str, list[TensorKey]] = {}
    producers: dict[TensorKey, str] = {}
    held: list[torch.Tensor] = []  # every tensor seen stays alive: no storage is reused during the probe

    def on_input(lin_name: str) -> Any:
        def hook(m: nn.Module, args: tuple) -> None:
            x = args[0]
            held.append(x)
            if lin_name not in calls:
                order.append(lin_name)
            calls.setdefault(lin_name, []).append(_key(x))
        return hook

    def on_output(mod_name: str) -> Any:
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            t = _first_tensor(out)
            if t is not None:
                held.append(t)
                producers.setdefault(_key(t), mod_name)  # hooks fire innermost first
        return hook

    def weighted(m: nn.Module) -> bool:  # a norm or a linear: a module a scale could live in (not act, dropout)
        return next(m.parameters(recurse=False), None) is not None

    def stop(m: nn.Module, args: tuple, out: Any) -> None:
        raise _StopProbe

    get_emb: Any = getattr(model, "get_input_embeddings", None)
    emb: Any = get_emb() if callable(get_emb) else None
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise _cannot(name, "the model has no input embedding (get_input_embeddings) to run a probe forward from")
    ids = (torch.arange(1, PROBE_TOKENS + 1) % emb.weight.shape[0])[None].to(emb.weight.device)
    handles = []
    for n, m in block.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(on_input(n)))
        if n and weighted(m):
            handles.append(m.register_forward_hook(on_output(n)))
    handles.append(block.register_forward_hook(stop))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _StopProbe:
        pass
    except Exception as e:  # noqa: BLE001 -- any failure of the probe is the same user-facing fact
        raise _cannot(name, f"its probe forward failed ({type(e).__name__}: {e})") from e
    else:
        raise _cannot(name, "a forward of the model never finished its first decoder block")
    finally:
        for h in handles:
            h.remove()
    return order, calls, producers


def derive_spec(model: nn.Module, name: str) -> ArchSpec:
    """The generic table of ``model`` (module docstring); logs what it found."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise _cannot(name, "it is an encoder-decoder model (the fallback orders the blocks of decoder-only ones)")
    path = find_blocks(model, name)
    blocks = model.get_submodule(path)
    assert isinstance(blocks, nn.ModuleList)
    names = [n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)]
    for i, b in enumerate(blocks):
        other = [n for n, m in b.named_modules() if isinstance(m, nn.Linear)]
        if other != names:
            more, less = [n for n in other if n not in names], [n for n in names if n not in other]
            raise _cannot(name, f"its decoder blocks at {path!r} differ (block {i} has linears {more[:6]} that block 0 "
                                f"lacks and lacks {less[:6]}, or orders them otherwise), and the fallback derives one "
                                "table for all")
    order, calls, producers = probe_block(model, blocks[0], name)
    idle = [n for n in names if n not in calls]
    if idle:
        raise _cannot(name, f"linears {idle[:6]} of block 0 did not run in a forward of {PROBE_TOKENS} tokens (a "
                            "conditional branch or expert routing?), so it cannot place them")
    groups: dict[tuple[TensorKey, ...], list[str]] = {}
    for n in order:  # first-call order: groups and their linears come out in execution order
        groups.setdefault(tuple(calls[n]), []).append(n)
    spec = ArchSpec(name, path, tuple(LinearGroup(producers.get(sig[0], ""), tuple(lins), foldable=False)
                                      for sig, lins in groups.items()), tokenwise=(), derived=True)
    log.info("%s has no architecture table entry: derived a generic one from a forward of block 0 -- %d blocks at "
             "%s, %d linears in %d groups in execution order: %s. RTN, imatrix-RTN and GPTQ use it; AWQ and "
             "SmoothQuant need a table entry.", name, len(blocks), path, len(order), len(spec.groups), describe(spec))
    return spec


def describe(spec: ArchSpec) -> str:
    """The groups of ``spec`` as ``(q, k, v) <- norm; (o); ...`` (the feeding module where one was seen)."""
    return "; ".join(f"({', '.join(g.linears)})" + (f" <- {g.prev}" if g.prev else "") for g in spec.groups)
