"""The full input second moment ``Hbar = 1/n X^T X (in, in)`` of every block linear, one block at a time.

GPTQ needs it to quantize a layer, and the GPTQ cost's correlation factor reads it. A collect-only block
method on the block engine (:mod:`lowbit.pipeline.blockwise`): the float model's activations, one forward per
block, one observer per group of linears sharing an input; ``on_block(prefix, {name: Hbar})`` is called per
block (names within the block), so only one block's matrices live at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.core.qweight import QuantizedWeight
from lowbit.pipeline.blockwise import BlockContext, BlockMethod, collect, run_blockwise
from lowbit.pipeline.hessian import HessianObserver

OnBlock = Callable[[BlockContext, dict[str, torch.Tensor]], None]


@dataclass
class HessianPass(BlockMethod):
    """Collects ``Hbar`` per linear of each block and hands them to ``on_block``."""

    on_block: OnBlock
    needs_calibration: bool = True
    collect_only: bool = True

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        firsts = [g.linears[0] for g in ctx.spec.groups if g.linears[0] in ctx.linears]
        obs = collect(ctx, lambda n, lin: HessianObserver(lin.in_features, ctx.device), names=firsts,
                      keep_outputs=True)
        out: dict[str, torch.Tensor] = {}
        for g in ctx.spec.groups:
            o = obs.get(g.linears[0])
            if o is None:
                continue
            Hbar = o.H.mul_(0.5)  # type: ignore[attr-defined]  # H = 2/n X^T X
            for n in g.linears:
                out[n] = Hbar
        self.on_block(ctx, out)
        return {}


def hessian_pass(model: nn.Module, tokens: torch.Tensor, on_block: OnBlock, progress: bool = True,
                 device: str | torch.device = "cpu") -> None:
    """Run ``tokens (n, T)`` through ``model`` (held on the CPU; each block visits ``device``) block by block,
    calling ``on_block`` with each block's ``Hbar`` (on ``device``)."""
    run_blockwise(model, HessianPass(on_block), tokens, device=device, progress=progress)
