"""The data-type methods (NF4/FP4, LLM.int8, FP8) as block methods of the block-by-block engine.

NF4, FP4 and FP8 need no calibration: each linear is quantized from its weights alone. LLM.int8
runs the calibration tokens through each float block once, recording ``max_t |x_tj|`` for every
input column ``j`` of every linear; columns at or above the threshold become its 16-bit outlier
columns (:mod:`lowbit.methods.llm_int8`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.core.dtypes import DataTypeScheme
from lowbit.methods.fp8 import quantize_fp8
from lowbit.methods.llm_int8 import quantize_int8
from lowbit.methods.nf4 import quantize_4bit
from lowbit.pipeline.blockwise import BlockContext, BlockMethod, collect


class AbsMaxObserver:
    """Largest ``|x_j|`` per input column over every token of the inputs ``x (..., in)``."""

    def __init__(self, in_features: int) -> None:
        self.max = torch.zeros(in_features, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).to(device="cpu", dtype=torch.float32)
        torch.maximum(self.max, m, out=self.max)


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


@dataclass
class DataTypeMethod(BlockMethod):
    """Quantize every linear of a block to ``scheme``'s number format.

    ``act_absmax`` keeps the LLM.int8 calibration statistics (``{full name: (in,)}``) and
    ``outlier_columns`` how many columns each layer keeps in 16-bit, for reports.
    """

    scheme: DataTypeScheme
    scale_dtype: torch.dtype = torch.bfloat16
    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    outlier_columns: dict[str, int] = field(default_factory=dict)
    run_state: ClassVar[tuple[str, ...]] = ("act_absmax", "outlier_columns")

    def __post_init__(self) -> None:
        self.needs_calibration = self.scheme.dtype == "int8"  # LLM.int8's outlier columns need data

    def quantize_block(self, ctx: BlockContext) -> dict[str, Any]:
        s = self.scheme
        if s.dtype in ("nf4", "fp4"):
            return {n: quantize_4bit(lin.weight, s, dtype=self.scale_dtype) for n, lin in ctx.linears.items()}
        if s.dtype == "fp8_e4m3":
            return {n: quantize_fp8(lin.weight, s, scale_dtype=self.scale_dtype) for n, lin in ctx.linears.items()}
        obs = collect(ctx, lambda n, lin: AbsMaxObserver(lin.in_features), keep_outputs=True)
        out = {}
        for n, lin in ctx.linears.items():
            stats = _all_reduce_max(obs[n].max)  # type: ignore[attr-defined]
            full = f"{ctx.spec.blocks}.{ctx.index}.{n}"
            self.act_absmax[full] = stats
            w = quantize_int8(lin.weight, s, act_absmax=stats)
            self.outlier_columns[full] = 0 if w.outlier_idx is None else int(w.outlier_idx.numel())
            out[n] = w
        return out
