"""Model-level quantization: the block methods of RTN and importance-weighted RTN, and one entry
point that runs any of them through the block-by-block engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import SchemeError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.rtn import quantize_rtn
from lowbit.models.archs import ArchSpec, block_linears, get_arch, get_blocks
from lowbit.pipeline.awq import AWQMethod, AWQResult
from lowbit.pipeline.blockwise import BlockContext, BlockMethod, collect, run_blockwise
from lowbit.pipeline.distributed import sum_weighted
from lowbit.pipeline.gptq import GPTQMethod

log = logging.getLogger(__name__)


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
class RTNMethod:
    """Round-to-nearest, optionally with the clipping search (no calibration)."""

    scheme: QuantScheme
    search: bool = False
    scale_dtype: torch.dtype = torch.bfloat16
    needs_calibration: bool = False

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        return {n: quantize_rtn(lin.weight, self.scheme, search=self.search, scale_dtype=self.scale_dtype)
                for n, lin in ctx.linears.items()}


@dataclass
class ImatrixRTNMethod:
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
            self.importance[f"{ctx.spec.blocks}.{ctx.index}.{n}"] = imp
            out[n] = quantize_rtn(lin.weight, self.scheme, importance=imp.to(lin.weight.device),
                                  scale_dtype=self.scale_dtype)
        return out


METHODS = ("rtn", "imatrix-rtn", "gptq", "awq", "awq+gptq")


def make_method(name: str, scheme: QuantScheme, *, search: bool = False,
                scale_dtype: torch.dtype = torch.bfloat16, gptq: GPTQConfig | None = None,
                true_sequential: bool = True, hessians_on_cpu: bool = False,
                awq_preset: AWQResult | None = None, awq_clip: bool = False,
                awq_objective: str = "parent", awq_options: dict[str, Any] | None = None) -> BlockMethod:
    """The block method ``name`` for ``scheme``; ``awq_options`` are further :class:`AWQMethod` fields."""
    if name in ("awq", "awq+gptq"):
        inner = None
        if name == "awq+gptq":
            inner = GPTQMethod(scheme, gptq or GPTQConfig(search=search), true_sequential=true_sequential,
                               hessians_on_cpu=hessians_on_cpu, scale_dtype=scale_dtype)
        return AWQMethod(scheme, scale_dtype=scale_dtype, inner=inner, preset=awq_preset, clip=awq_clip,
                         objective=awq_objective, **(awq_options or {}))
    if awq_preset is not None:
        raise SchemeError(f"an AWQ search result applies with --method awq or awq+gptq, not {name!r}")
    if name == "rtn":
        return RTNMethod(scheme, search=search, scale_dtype=scale_dtype)
    if name == "imatrix-rtn":
        return ImatrixRTNMethod(scheme, scale_dtype=scale_dtype)
    if name == "gptq":
        cfg = gptq or GPTQConfig(search=search)
        return GPTQMethod(scheme, cfg, true_sequential=true_sequential, hessians_on_cpu=hessians_on_cpu,
                          scale_dtype=scale_dtype)
    raise SchemeError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")


def named_linears(model: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Linear]]:
    """``(full name, linear)`` of every quantizable linear of every block, in order."""
    return [(f"{spec.blocks}.{i}.{n}", lin) for i, b in enumerate(get_blocks(model, spec))
            for n, lin in block_linears(b, spec, i).items()]


def check_group_size(scheme: QuantScheme, names: list[tuple[str, nn.Linear]]) -> None:
    """Refuse, before any work, a group size that does not divide some linear's input dimension."""
    for name, lin in names:
        try:
            scheme.n_groups(lin.in_features)
        except SchemeError as e:
            raise SchemeError(f"{name}: {e}") from None


def quantize_model(model: nn.Module, scheme: QuantScheme | None, method: str | BlockMethod = "rtn", *,
                   tokens: torch.Tensor | None = None, search: bool = False, device: str = "cpu",
                   scale_dtype: torch.dtype = torch.bfloat16, progress: bool = True,
                   offload_activations: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize the decoder linears of ``model`` in place (fake-quant) and return their packed form.

    ``method`` is a name of :data:`METHODS` or a ready :class:`BlockMethod` (e.g. a configured
    :class:`~lowbit.pipeline.gptq.GPTQMethod`); ``scheme`` may be None with a ready method whose
    weights are not integer-grid ones (the data-type methods).
    """
    spec = get_arch(model)
    if scheme is not None:
        check_group_size(scheme, named_linears(model, spec))
    m: BlockMethod
    if isinstance(method, str):
        if scheme is None:
            raise SchemeError(f"method {method!r} needs an integer scheme (e.g. W4A16)")
        m = make_method(method, scheme, search=search, scale_dtype=scale_dtype)
    else:
        m = method
    return run_blockwise(model, m, tokens, device=device, progress=progress, offload_activations=offload_activations)
