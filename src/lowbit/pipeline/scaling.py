"""Per-input-channel scales folded exactly into a block (AWQ, SmoothQuant).

For a group of linears ``L_1..L_n`` sharing the input ``x`` produced by ``prev`` (a norm or a
linear, from :mod:`lowbit.models.archs`), and scales ``s (in,)`` > 0::

    x' = x / s                 (folded into prev: a norm's weight, or a linear's rows and bias)
    W_i' = W_i * s             (every column j of every linear of the group times s_j)
    =>  W_i' x' = W_i x        (the float model's output is unchanged, up to rounding)

A norm computing ``x_hat * w`` gets ``w' = w / s``; one computing ``x_hat * (1 + w)`` (Gemma,
``norm_offset = 1``) gets ``w' = (1 + w) / s - 1``. A linear ``prev`` (v -> o, up -> down) gets its
output rows and bias divided by ``s``; that needs ``prev``'s output size to equal the group's
input size, which grouped-query attention breaks for v -> o (the v heads are repeated), so
:func:`can_fold` says no there and the mapping is skipped, as AutoAWQ and llm-compressor do.
A group reading part ``i`` of ``k`` equal row chunks of a fused linear (``prev_part``: Phi-3's
``down_proj`` reads the up half of ``gate_up_proj``) divides only those rows; a group the table marks
``foldable=False`` (the v part of a fused ``qkv_proj``, a table derived without a mapping) is never folded.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.errors import SchemeError
from lowbit.models.archs import ArchSpec, LinearGroup


def _prev_rows(block: nn.Module, group: LinearGroup) -> tuple[int, int] | None:
    """The rows ``[r0, r1)`` of ``prev``'s output that are the group's input: all of a linear's or a norm's
    weight length, or part ``i`` of ``k`` equal chunks of a linear's (``prev_part``); None if unknown."""
    prev = block.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        n = prev.out_features
    else:
        w = getattr(prev, "weight", None)
        if w is None or group.prev_part is not None:
            return None
        n = int(w.numel())
    if group.prev_part is None:
        return 0, n
    i, k = group.prev_part
    if n % k or not 0 <= i < k:
        return None
    return i * n // k, (i + 1) * n // k


def prev_out_features(block: nn.Module, group: LinearGroup) -> int | None:
    """Size of the part of ``prev``'s output the group reads (:func:`_prev_rows`)."""
    rows = _prev_rows(block, group)
    return None if rows is None else rows[1] - rows[0]


def can_fold(block: nn.Module, group: LinearGroup) -> bool:
    """Whether scales on the group's input can be folded into ``prev`` exactly."""
    if not group.foldable or not group.prev:
        return False
    ins = {block.get_submodule(n).in_features for n in group.linears}
    return len(ins) == 1 and prev_out_features(block, group) in ins


@torch.no_grad()
def fold_scales(block: nn.Module, spec: ArchSpec, group: LinearGroup, scales: torch.Tensor) -> None:
    """Divide the group's input by ``scales (in,)`` inside ``prev`` and multiply its linears' columns."""
    if not can_fold(block, group):
        raise SchemeError(f"{spec.name}: cannot fold scales of {group.linears} into {group.prev!r} "
                          "(its output size differs from their input size)")
    s = scales.detach().to(torch.float32)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise SchemeError("smoothing scales must be finite and positive")
    prev = block.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        r0, r1 = _prev_rows(block, group) or (0, prev.out_features)
        w = prev.weight[r0:r1]
        w.copy_((w.to(torch.float32) / s.to(w.device)[:, None]).to(w.dtype))
        if prev.bias is not None:
            b = prev.bias[r0:r1]
            b.copy_((b.to(torch.float32) / s.to(b.device)).to(b.dtype))
    else:
        nw = prev.weight
        assert isinstance(nw, torch.Tensor)
        off = spec.norm_offset
        nw.copy_(((nw.to(torch.float32) + off) / s.to(nw.device) - off).to(nw.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_((bias.to(torch.float32) / s.to(bias.device)).to(bias.dtype))
    for name in group.linears:
        lw = block.get_submodule(name).weight
        assert isinstance(lw, torch.Tensor)
        lw.copy_((lw.to(torch.float32) * s.to(lw.device)[None, :]).to(lw.dtype))
