"""Importance matrix (llama.cpp's ``imatrix``) through the block-by-block engine.

For each decoder linear ``W (out, in)``: ``in_sum2[j] = sum_t x_tj^2`` over every calibration token t of
its input, and the token count. Statistics come from the float model (one forward per block, the float
outputs feed the next block), as llama.cpp's ``llama-imatrix`` computes them; nothing is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from lowbit.core.qweight import QuantizedWeight
from lowbit.pipeline.blockwise import BlockContext, BlockMethod, collect, run_blockwise
from lowbit.pipeline.distributed import sum_weighted
from lowbit.pipeline.rtn import SquareMeanObserver


@dataclass
class ImatrixCollector(BlockMethod):
    """Block method that only collects: ``sums[full name] (in,)`` float64, ``counts[full name]`` tokens."""

    needs_calibration: bool = True
    collect_only: bool = True
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    run_state: ClassVar[tuple[str, ...]] = ("sums", "counts")

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        obs = collect(ctx, lambda n, lin: SquareMeanObserver(lin.in_features), keep_outputs=True)
        for n, o in obs.items():
            mean, count = sum_weighted(o.sum / max(o.count, 1), o.count)  # type: ignore[attr-defined]
            key = f"{ctx.prefix}.{n}"
            self.sums[key] = mean * count
            self.counts[key] = count
        return {}


def collect_imatrix(model: nn.Module, tokens: torch.Tensor, device: str | torch.device = "cpu",
                    progress: bool = True) -> ImatrixCollector:
    """Run ``tokens (n, T)`` through ``model`` block by block and return the per-linear sums of squares."""
    col = ImatrixCollector()
    run_blockwise(model, col, tokens, device=device, progress=progress)
    return col
