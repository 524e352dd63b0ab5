"""Capturing the inputs of block 0 (and the keyword arguments of every block) for calibration.

    tokens (n, T) --embed--> inputs of block 0, recorded by a forward pre-hook (no module swap)

Only what lies outside the decoder blocks visits the device (and, for models whose blocks take
per-layer arguments, each block once, for the first sample); with ``offload`` the captured
activations go to pinned host memory at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.models.archs import ArchSpec, get_blocks
from lowbit.pipeline.transfer import to_home


class _StopForward(Exception):
    """Raised by the capture hook once block 0's input is recorded."""


def _move_outside_blocks(model: nn.Module, prefix: str, device: torch.device,
                         homes: dict[str, torch.Tensor] | None = None, head: bool = True) -> dict[str, torch.Tensor]:
    """Move what lies outside the decoder blocks (embeddings, final norm, and the output head unless
    ``head`` is False) to ``device``, or, given the ``homes`` a first call returned, point it back at
    its unchanged host tensors (no copy back)."""
    moved: dict[str, torch.Tensor] = {}
    m: Any = model
    out_emb = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    in_emb = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
    skip: set[int] = set()
    if not head and out_emb is not None and (in_emb is None or out_emb.weight is not in_emb.weight):
        skip = {id(p) for p in out_emb.parameters()}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(prefix + ".") or id(t) in skip:
            continue
        if homes is not None:
            t.data = homes.get(name, t.data)
        elif device.type != "cpu" and t.device != device:
            moved[name] = t.data
            t.data = t.data.to(device)
    return moved



@torch.inference_mode()
def capture_inputs(model: nn.Module, tokens: torch.Tensor, spec: ArchSpec, device: torch.device,
                   offload: bool = False) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Inputs of block 0 for every sample ``tokens (n, T)``, and the kwargs of every block.

    With ``offload`` the activations are kept in (pinned) CPU memory and visit the device one
    sample at a time: device memory then holds no ``n x T x hidden`` activations at all.

    Models whose config names several ``layer_types`` (sliding and full attention: Gemma 3,
    Qwen2 / Mistral with sliding windows) pass each block its own masks and rotary embeddings:
    their first sample runs the whole model once to record them. Otherwise every block receives
    block 0's kwargs and no sample goes past block 0.
    """
    blocks = get_blocks(model, spec)
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = [{} for _ in blocks]
    layer_types = getattr(getattr(model, "config", None), "layer_types", None) or []
    per_layer = len(set(layer_types)) > 1
    probing = per_layer

    def pre(i: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
            if i == 0:
                h = args[0] if args else kw["hidden_states"]
                hidden.append(to_home(h, torch.device("cpu")) if offload else h)
                if not kwargs[0]:
                    kwargs[0] = {k: v for k, v in kw.items() if k != "hidden_states"}
            if probing:
                kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
                if device.type != "cpu":
                    mod.to(device)
                return
            raise _StopForward
        return hook

    def post(mod: nn.Module, args: tuple, out: Any) -> None:
        if probing and device.type != "cpu":
            mod.to("cpu")

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post) for b in blocks]
    homes = _move_outside_blocks(model, spec.blocks, device, head=per_layer)  # the head runs only when probing
    try:
        for s in range(tokens.shape[0]):
            try:
                model(tokens[s : s + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            probing = False
    finally:
        for h in handles:
            h.remove()
        _move_outside_blocks(model, spec.blocks, device, homes)
    if not per_layer:
        kwargs = [kwargs[0]] * len(blocks)
    for kw in kwargs:
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kw["use_cache"] = False
    return hidden, kwargs
