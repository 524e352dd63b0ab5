"""Round-to-nearest as block methods: plain RTN (no data) and importance-weighted RTN (imatrix).

Both quantize each linear ``W (out, in)`` on its own (:func:`lowbit.methods.rtn.quantize_rtn`).
Importance-weighted RTN first runs the calibration tokens through the block and accumulates
``E[x_j^2]`` over every token of each linear's input (llama.cpp's imatrix), then weights the
clipping search's error of input column ``j`` by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import quantize_rtn
from lowbit.pipeline.blockwise import BlockContext, BlockMethod, collect
from lowbit.pipeline.distributed import sum_weighted


@dataclass(frozen=True)
class RTNConfig:
    """Round to nearest; ``search`` fits each group's clipping range by an MSE search (off by default).

    With a data-type scheme (NF4, FP4, INT8-LLM, FP8) this is the data type's own rounding."""

    search: bool = False


@dataclass(frozen=True)
class ImatrixConfig:
    """RTN whose clipping search weights input column ``j`` by ``E[x_j^2]`` on the calibration text.

    ``propagate``: statistics on the inputs the already-quantized blocks produce (two forwards per
    block) instead of the float model's (one forward per block, as llama.cpp's ``imatrix`` does)."""

    propagate: bool = False


class SquareMeanObserver:
    """Accumulates ``E[x_j^2]`` over every token of the inputs ``x (..., in)`` (float64 sums)."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.sum += x.square().sum(0).to(device="cpu", dtype=torch.float64)
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).to(torch.float32)


@dataclass
class RTNMethod(BlockMethod):
    """Round-to-nearest, optionally with the clipping search (no calibration)."""

    scheme: QuantScheme
    search: bool = False
    scale_dtype: torch.dtype = torch.bfloat16
    needs_calibration: bool = False

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        return {n: quantize_rtn(lin.weight, ctx.scheme(n, self.scheme), search=self.search,
                                scale_dtype=self.scale_dtype) for n, lin in ctx.linears.items()}


@dataclass
class ImatrixRTNMethod(BlockMethod):
    """RTN whose clipping search weights each input channel by ``E[x^2]`` (llama.cpp imatrix idea).

    With ``propagate`` the statistics of a block are collected on its inputs as produced by the
    already-quantized blocks before it (two forwards per block); without (the default, as
    llama.cpp's ``imatrix`` tool does) on the float model's activations (one forward per block).
    ``importance`` keeps them (``{full name: (in,)}``) for reports and reuse.
    """

    scheme: QuantScheme
    scale_dtype: torch.dtype = torch.bfloat16
    propagate: bool = False
    needs_calibration: bool = True
    importance: dict[str, torch.Tensor] = field(default_factory=dict)

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        obs = collect(ctx, lambda n, lin: SquareMeanObserver(lin.in_features), keep_outputs=not self.propagate)
        out = {}
        for n, lin in ctx.linears.items():
            o = obs[n]
            imp, _ = sum_weighted(o.mean(), o.count)  # type: ignore[attr-defined]
            self.importance[f"{ctx.prefix}.{n}"] = imp
            out[n] = quantize_rtn(lin.weight, ctx.scheme(n, self.scheme), importance=imp.to(lin.weight.device),
                                  scale_dtype=self.scale_dtype)
        return out
