"""SmoothQuant W8A8 as a block method of the block-by-block engine.

Per decoder block (its inputs produced by the already-quantized blocks before it):

1. one run of the block records ``a_j = max_t |x_tj|`` for the input of every group of linears
   of the architecture table (q/k/v after the attention norm, o after v, gate/up after the MLP
   norm, down after up), the first linear of each group standing for the group;
2. every group whose scales fold exactly (:func:`lowbit.pipeline.scaling.can_fold`; not v -> o
   under grouped-query attention) gets ``s = a^alpha / w^(1-alpha)``
   (:func:`lowbit.methods.smoothquant.smooth_scales`), folded into the feeding norm or linear:
   ``x' = x / s``, ``W' = W diag(s)``; the float block computes the same function;
3. every linear is quantized to int8 per output channel (:func:`~lowbit.methods.smoothquant.quantize_w8`);
4. ``W8A8_STATIC``: each linear's static input scale is ``max_j (a_j / s_j) / 127`` -- the absmax
   of its *smoothed* input, exact because the fold divides that input by ``s`` elementwise (up to
   the rounding of the folded weights in the model dtype).

``alpha=None`` skips smoothing (plain W8A8: int8 weights, and static scales calibrated when asked).
The engine then writes ``W_hat`` back into the linears (weights fake-quantized; activations in
memory stay float): the int8 activations run in the artifact's :class:`~lowbit.core.w8a8_linear.W8A8Linear`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.core.errors import SchemeError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.methods import smoothquant as sq
from lowbit.pipeline.blockwise import BlockContext, BlockMethod, collect
from lowbit.pipeline.datatypes import AbsMaxObserver
from lowbit.pipeline.scaling import can_fold, fold_scales

log = logging.getLogger(__name__)


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over data-parallel ranks (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant's migration strength ``alpha`` in [0, 1] (``s = a^alpha / w^(1-alpha)``), for W8A8 schemes;
    ``inner``: the int8 weights by RTN (None) or GPTQ (a ``GPTQConfig``, llm-compressor's common recipe)."""

    alpha: float = 0.5
    inner: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise SchemeError(f"SmoothQuant alpha must lie in [0, 1], got {self.alpha!r}")


@dataclass
class SmoothQuantMethod(BlockMethod):
    """SmoothQuant (``alpha``) + int8 per-channel weights for ``W8A8`` / ``W8A8_STATIC`` schemes.

    Results kept for reports and the artifact: ``smooth_scales {block.prev full name: (in,)}``
    (one per folded group), ``input_scales {linear full name: float}`` (static schemes only),
    ``act_absmax {linear full name: (in,)}`` (the smoothed inputs' per-channel absmax).
    """

    scheme: QuantScheme
    alpha: float | None = 0.5
    scale_dtype: torch.dtype = torch.bfloat16
    eps: float = 1e-5
    needs_calibration: bool = True
    smooth_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    input_scales: dict[str, float] = field(default_factory=dict)
    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    inner: BlockMethod | None = None  # quantizes the smoothed block's weights (None: RTN int8 per channel)
    run_state: ClassVar[tuple[str, ...]] = ("smooth_scales", "input_scales", "act_absmax")

    @property
    def inner_method(self) -> BlockMethod | None:
        return self.inner

    @property
    def folds_scales(self) -> str | None:
        return "SmoothQuant" if self.alpha is not None else None  # plain W8A8 folds nothing

    @property
    def float_inputs(self) -> bool:  # type: ignore[override]
        return self.inner is not None and self.inner.float_inputs

    def __post_init__(self) -> None:
        s = self.scheme
        if s.act_bits != 8 or s.bits != 8 or s.group_size is not None or not s.symmetric:
            raise SchemeError(f"SmoothQuant quantizes to W8A8 (int8 per-channel weights, int8 activations); "
                              f"got {s.label}: use --scheme W8A8 or W8A8_STATIC")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise SchemeError(f"SmoothQuant alpha must lie in [0, 1], got {self.alpha}")
        # plain dynamic W8A8 by RTN needs no data
        self.needs_calibration = self.static or self.alpha is not None or self.inner is not None

    @property
    def static(self) -> bool:
        return self.scheme.act_strategy == "tensor"

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        self.smooth(ctx)
        if self.inner is not None:
            return self.inner.quantize_block(ctx)
        return {n: sq.quantize_w8(lin.weight, self.scheme, self.scale_dtype) for n, lin in ctx.linears.items()}

    def smooth(self, ctx: BlockContext) -> None:
        """Steps 1, 2 and 4 of the module docstring on one block: statistics, folded scales, static scales.

        Leaves the block computing the same float function (its weights smoothed, not quantized).
        """
        prefix = f"{ctx.spec.blocks}.{ctx.index}"
        groups = [g for g in ctx.spec.groups if self.static or (self.alpha is not None and can_fold(ctx.block, g))]
        if not groups:  # dynamic W8A8 without smoothing: nothing to measure
            return
        obs = collect(ctx, lambda n, lin: AbsMaxObserver(lin.in_features), names=[g.linears[0] for g in groups])
        for g in groups:
            amax = _all_reduce_max(obs[g.linears[0]].max)  # type: ignore[attr-defined]
            if self.alpha is not None and can_fold(ctx.block, g):
                s = sq.smooth_scales(amax, [ctx.linears[n].weight for n in g.linears], self.alpha, self.eps)
                fold_scales(ctx.block, ctx.spec, g, s)
                self.smooth_scales[f"{prefix}.{g.prev}"] = s
                amax = amax / s
            elif self.alpha is not None:
                log.debug("%s: %s -> %s not smoothed (the fold would not be exact)", prefix, g.prev, g.linears)
            for n in g.linears:
                self.act_absmax[f"{prefix}.{n}"] = amax
                if self.static:
                    self.input_scales[f"{prefix}.{n}"] = float(sq.act_scale_static(amax, self.scale_dtype))
