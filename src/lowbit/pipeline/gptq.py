"""GPTQ in the block-by-block pipeline: Hessians collected by hooks, true-sequential order.

For each group of linears that share an input (from the architecture table, in execution
order: q/k/v -> o -> gate/up -> down), one run of the block accumulates ``H = 2 X^T X`` of that
input; every linear of the group is quantized with it and its dequantized weights are written
back before the next group's run, so each group sees the already-quantized outputs of the
previous ones. Without ``true_sequential`` one run collects the Hessians of every group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptq import GPTQConfig, GPTQStats, gptq_quantize
from lowbit.pipeline.blockwise import BlockContext, collect
from lowbit.pipeline.distributed import broadcast_object, broadcast_qweight, sum_weighted, world

log = logging.getLogger(__name__)


class HessianObserver:
    """Running ``H = 2/n sum_t x_t x_t^T`` over every token ``x_t (in,)`` seen, in float32.

    Kept on ``device`` (the block's device, or the CPU to save accelerator memory). On CUDA,
    16-bit activations are multiplied as they are with float32 accumulation (exact products,
    tensor-core speed); elsewhere they are upcast to float32 first.
    """

    def __init__(self, in_features: int, device: torch.device | str, timers: dict[str, float] | None = None
                 ) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        self.timers = timers

    def update(self, x: torch.Tensor) -> None:
        t0 = _tick(self.timers, self.H.device)
        x = x.detach().reshape(-1, x.shape[-1])
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
            xx = x.to(self.H.device)
            self.H.add_(torch.mm(xx.T, xx, out_dtype=torch.float32), alpha=2.0 / self.n)
        else:
            x = x.to(device=self.H.device, dtype=torch.float32) * (2.0 / self.n) ** 0.5
            self.H.addmm_(x.T, x)
        _tock(self.timers, "hessian", t0, self.H.device)


def _tick(timers: dict[str, float] | None, device: torch.device) -> float:
    if timers is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _tock(timers: dict[str, float] | None, key: str, t0: float, device: torch.device) -> None:
    if timers is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timers[key] = timers.get(key, 0.0) + time.perf_counter() - t0


@dataclass
class GPTQMethod:
    scheme: QuantScheme
    config: GPTQConfig = field(default_factory=GPTQConfig)
    true_sequential: bool = True
    hessians_on_cpu: bool = False
    scale_dtype: torch.dtype = torch.bfloat16
    needs_calibration: bool = True
    stats: dict[str, GPTQStats] = field(default_factory=dict)
    timers: dict[str, float] | None = None  # phase -> seconds (synchronising) when a dict is given

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        hdev = torch.device("cpu") if self.hessians_on_cpu else ctx.device
        groups = [g.linears for g in ctx.spec.groups]
        stages = groups if self.true_sequential else [tuple(n for g in groups for n in g)]
        out: dict[str, QuantizedWeight] = {}
        rank, size = world()
        solved = 0
        for stage in stages:
            firsts = [g[0] for g in groups if g[0] in stage]
            t0 = _tick(self.timers, ctx.device)
            obs = collect(ctx, lambda n, lin: HessianObserver(lin.in_features, hdev, self.timers), names=firsts)
            _tock(self.timers, "forward+hessian", t0, ctx.device)
            for g in groups:
                if g[0] not in stage:
                    continue
                o = obs[g[0]]
                H, _ = sum_weighted(o.H, o.n)  # type: ignore[attr-defined]
                lins = [ctx.linears[n] for n in g]
                owner = solved % size
                solved += 1
                # the linears of a group share H: one solve over their stacked rows (rows are independent)
                W = torch.cat([lin.weight.to(H.device) for lin in lins])
                qw, st = None, None
                if owner == rank:
                    name = f"{ctx.spec.blocks}.{ctx.index}.{'+'.join(g)}"
                    qw, st = gptq_quantize(W, H, self.scheme, self.config, scale_dtype=self.scale_dtype, name=name,
                                           timers=self.timers)
                dynamic = self.config.act_order and not self.config.static_groups
                qw = broadcast_qweight(qw, owner, tuple(W.shape), self.scheme,  # type: ignore[arg-type]
                                       self.scale_dtype, H.device, dynamic)
                st = broadcast_object(st, owner)  # type: ignore[assignment]
                assert isinstance(st, GPTQStats) and st.row_loss is not None
                r0 = 0
                t0 = _tick(self.timers, ctx.device)
                for n, lin in zip(g, lins, strict=True):
                    r1 = r0 + lin.out_features
                    part = QuantizedWeight(qw.codes[r0:r1].clone(), qw.scales[r0:r1].clone(), qw.zeros[r0:r1].clone(),
                                           qw.scheme, None if qw.g_idx is None else qw.g_idx.clone())
                    lin.weight.data.copy_(part.dequantize(lin.weight.dtype).to(lin.weight.device))
                    out[n] = part
                    self.stats[f"{ctx.spec.blocks}.{ctx.index}.{n}"] = GPTQStats(
                        float(st.row_loss[r0:r1].sum()), st.damp, st.dead_columns)
                    r0 = r1
                _tock(self.timers, "write-back", t0, ctx.device)
            del obs
        return out
