"""GPTQ in the block-by-block pipeline: Hessians collected by hooks, true-sequential order.

For each group of linears that share an input (from the architecture table, in execution
order: q/k/v -> o -> gate/up -> down), one run of the block accumulates ``H = 2 X^T X`` of that
input; every linear of the group is quantized with it and its dequantized weights are written
back before the next group's run, so each group sees the already-quantized outputs of the
previous ones. Without ``true_sequential`` one run collects the Hessians of every group.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptaq import cross_product
from lowbit.methods.gptq import GPTQConfig, GPTQStats, HessianConsumed, gptq_quantize
from lowbit.pipeline.blockwise import BlockContext, collect
from lowbit.pipeline.distributed import broadcast_object, broadcast_qweight, sum_weighted, world
from lowbit.pipeline.paired import collect_paired, float_weights
from lowbit.pipeline.transfer import to_host_async

log = logging.getLogger(__name__)


class HessianObserver:
    """``H = 2/n sum_t x_t x_t^T`` over every token ``x_t (in,)`` seen, in float32.

    Tokens are summed unscaled (one fused ``S += X^T X`` per batch, no rescaling pass over the
    ``in x in`` buffer) and ``H`` scales the sum by ``2/n`` in place, once, when first read. Kept
    on ``device`` (the block's device, or the CPU to save accelerator memory). On CUDA, 16-bit
    activations are multiplied as they are with float32 accumulation (exact products, tensor-core
    speed); elsewhere they are upcast to float32 first.
    """

    def __init__(self, in_features: int, device: torch.device | str, timers: dict[str, float] | None = None,
                 cross: bool = False, keep_top: int = 0) -> None:
        self._S = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        # with ``keep_top`` = K: the K tokens of largest norm seen, ``top (K, in)`` float32 (massive
        # activations, attention sinks: what a mean-squared objective weighs least)
        self.keep_top = keep_top
        self.top = torch.zeros(0, in_features, dtype=torch.float32, device=device)
        # with ``cross``: also D = 2/n sum_t (x_float_t - x_t) x_t^T, paired with the float model's inputs
        self._C = torch.zeros_like(self._S) if cross else None
        self.n = 0
        self.timers = timers
        self._final = False

    def update(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        if self._final:
            raise RuntimeError("HessianObserver.update after H was read")
        t0 = _tick(self.timers, self._S.device)
        x = x.detach().reshape(-1, x.shape[-1])
        self.n += x.shape[0]
        fused = x.device.type == "cuda" and self._S.device.type == "cuda" and x.dtype in (torch.bfloat16,
                                                                                          torch.float16)
        # the inputs on the device of _S (and _C): half precision for the fused products, else fp32
        xx = x.to(self._S.device) if fused else x.to(device=self._S.device, dtype=torch.float32)
        if self._C is not None:
            if x_float is None:
                raise ValueError("this observer accumulates D: pass the float model's inputs too")
            xf = x_float.detach().reshape(-1, x.shape[-1])
            if fused and xf.dtype == x.dtype:
                # the difference of two half-precision values is rounded relative to itself, so it keeps
                # its digits; products in half precision, sums in fp32 (as for H)
                dd = xf.to(self._C.device) - xx
                torch.addmm(self._C, dd.T, xx, out_dtype=torch.float32, out=self._C)
            else:
                xq = xx.float()
                self._C.addmm_((xf.to(device=self._C.device, dtype=torch.float32) - xq).T, xq)
        if fused:
            torch.addmm(self._S, xx.T, xx, out_dtype=torch.float32, out=self._S)
        else:
            self._S.addmm_(xx.T, xx)
        if self.keep_top:
            rows = x.to(device=self.top.device, dtype=torch.float32)
            rows = rows[rows.norm(dim=1).topk(min(self.keep_top, rows.shape[0])).indices]
            both = torch.cat([self.top, rows])
            self.top = both[both.norm(dim=1).topk(min(self.keep_top, both.shape[0])).indices]
        _tock(self.timers, "hessian", t0, self._S.device)

    @property
    def H(self) -> torch.Tensor:
        """The Hessian (scaled in place on first read; no update after)."""
        if not self._final:
            self._S.mul_(2.0 / max(self.n, 1))
            if self._C is not None:
                self._C.mul_(2.0 / max(self.n, 1))
            self._final = True
        return self._S

    @property
    def D(self) -> torch.Tensor | None:
        """``D = 2/n (X_float - X)^T X`` (scaled on first read, like ``H``), or None."""
        _ = self.H
        return self._C


def _own(t: torch.Tensor, shared: bool) -> torch.Tensor:
    """``t`` in host memory of its own: an async pinned copy of a device tensor, a clone of a host
    view that shares its storage with other results (``shared``), else ``t`` itself."""
    if t.device.type != "cpu":
        return to_host_async(t)
    return t.clone() if shared else t


def _tick(timers: dict[str, float] | None, device: torch.device) -> float:
    if timers is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _tock(timers: dict[str, float] | None, key: str, t0: float, device: torch.device) -> None:
    """Add the seconds since ``t0`` to ``timers[key]``; on CUDA also the peak memory allocated since
    the previous tock to ``timers["peak:" + key]`` (the device's peak counter restarts here)."""
    if timers is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            pk = f"peak:{key}"
            timers[pk] = max(timers.get(pk, 0.0), float(torch.cuda.max_memory_allocated(device)))
            torch.cuda.reset_peak_memory_stats(device)
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
    writes_back = True  # quantize_block leaves the dequantized weights in the block (the engine need not)

    @property
    def float_inputs(self) -> bool:
        """Asymmetric calibration: the engine also carries the float model's block inputs."""
        return self.config.asym_alpha > 0

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        hdev = torch.device("cpu") if self.hessians_on_cpu else ctx.device
        groups = [g.linears for g in ctx.spec.groups]
        stages = groups if self.true_sequential else [tuple(n for g in groups for n in g)]
        out: dict[str, QuantizedWeight] = {}
        rank, size = world()
        solved = 0
        fw = None
        if self.float_inputs:  # the float block's weights and outputs, before anything is quantized
            assert ctx.fp_inputs is not None
            fw = float_weights(ctx)  # the float block's outputs come from the last stage's float runs
        top = self.config.search_guard if self.config.search else 0  # tokens kept for the search guard
        for stage in stages:
            firsts = [g[0] for g in groups if g[0] in stage]
            t0 = _tick(self.timers, ctx.device)
            obs: dict[str, Any]
            if fw is None:
                obs = collect(ctx, lambda n, lin: HessianObserver(lin.in_features, hdev, self.timers, keep_top=top),
                              names=firsts)
            else:
                obs = collect_paired(ctx, lambda n, lin: HessianObserver(lin.in_features, hdev, self.timers,
                                                                         cross=True, keep_top=top), firsts, fw,
                                     float_outputs=stage is stages[-1])
            _tock(self.timers, "forward+hessian", t0, ctx.device)
            for g in groups:
                if g[0] not in stage:
                    continue
                o = obs.pop(g[0])  # the Hessian is freed once solved, before the write-back
                H, _ = sum_weighted(o.H, o.n)  # type: ignore[attr-defined]
                D = None if fw is None else sum_weighted(o.D, o.n)[0]  # type: ignore[attr-defined]
                top_rows = o.top  # type: ignore[attr-defined]
                del o
                lins = [ctx.linears[n] for n in g]
                owner = solved % size
                solved += 1
                # GPTAQ needs D only through W D (out, in), on the solving rank: D (in, in) is freed before the solve
                WD = None if D is None or owner != rank else cross_product(_stacked(lins), D)
                del D
                # the linears of a group share H: one solve over their stacked rows (rows are independent),
                # written straight into the float32 working copy GPTQ consumes
                shape = (sum(lin.out_features for lin in lins), lins[0].in_features)
                qw, st = None, None
                if owner == rank:
                    if top_rows.shape[0]:
                        qw, st = self._guarded_solve(ctx, g, lins, H, top_rows, consume=size == 1,
                                                     wd=WD)
                    else:
                        qw, st = self._solve(ctx, g, lins, H, consume=size == 1, wd=WD)
                del H, WD
                dynamic = self.config.act_order and not self.config.static_groups
                qw = broadcast_qweight(qw, owner, shape, self.scheme,  # type: ignore[arg-type]
                                       self.scale_dtype, hdev, dynamic)
                st = broadcast_object(st, owner)  # type: ignore[assignment]
                assert isinstance(st, GPTQStats) and st.row_loss is not None
                r0 = 0
                t0 = _tick(self.timers, ctx.device)
                for n, lin in zip(g, lins, strict=True):
                    r1 = r0 + lin.out_features
                    part = qw if len(g) == 1 else QuantizedWeight(
                        qw.codes[r0:r1], qw.scales[r0:r1], qw.zeros[r0:r1], qw.scheme, qw.g_idx)
                    part.dequantize_into(lin.weight.data)
                    # results leave the device at once (later stages' peaks hold no codes); row slices
                    # are contiguous, so each linear gets host tensors of its own without a device clone
                    shared = len(g) > 1
                    out[n] = QuantizedWeight(_own(part.codes, shared), _own(part.scales, shared),
                                             _own(part.zeros, shared), qw.scheme,
                                             None if qw.g_idx is None else _own(qw.g_idx, shared))
                    self.stats[f"{ctx.spec.blocks}.{ctx.index}.{n}"] = GPTQStats(
                        float(st.row_loss[r0:r1].sum()), st.damp, st.dead_columns, searched=st.searched)
                    r0 = r1
                del qw, part  # not held through the next stage's forward
                _tock(self.timers, "write-back", t0, ctx.device)
            del obs
        return out

    def _guarded_solve(self, ctx: BlockContext, g: tuple[str, ...], lins: list[nn.Linear], H: torch.Tensor,
                       top: torch.Tensor, consume: bool, wd: torch.Tensor | None = None
                       ) -> tuple[QuantizedWeight, GPTQStats]:
        """The clipping search kept only where it does not raise the worst error on the
        largest-norm tokens ``top (K, in)``.

        The search minimises the mean output error ``tr(E H E^T)`` (``E = W - Q``), which weighs a
        token by ``1/n``: on models with massive activations it can trade a lower mean for a larger
        error on the few tokens that carry them (attention sinks; Sun et al., "Massive Activations
        in Large Language Models", 2024), which the whole model then feels. Both solves run; the
        search is kept iff ``max_t ||E_search x_t||^2 <= max_t ||E_plain x_t||^2`` over ``top``.
        """
        name = f"{ctx.spec.blocks}.{ctx.index}.{'+'.join(g)}"
        plain = dataclasses.replace(self.config, search=False, search_guard=0, search_power=1.0)
        q0, s0 = gptq_quantize(_stacked(lins), H, self.scheme, plain, scale_dtype=self.scale_dtype, name=name,
                               timers=self.timers, consume_weight=True, wd=wd)
        q1, s1 = self._solve(ctx, g, lins, H, consume=consume, wd=wd)
        W = _stacked(lins)
        x = top.to(device=W.device, dtype=torch.float32)
        worst = [float(((W - q.dequantize().to(W)) @ x.T).square().sum(0).max()) for q in (q0, q1)]
        keep = worst[1] <= worst[0]
        log.info("%s: clipping search %s (loss %.4g -> %.4g, worst top-token error %.4g -> %.4g)", name,
                 "kept" if keep else "dropped", s0.loss, s1.loss, worst[0], worst[1])
        q, st = (q1, s1) if keep else (q0, s0)
        st.searched = keep
        return q, st

    def _solve(self, ctx: BlockContext, g: tuple[str, ...], lins: list[nn.Linear], H: torch.Tensor, consume: bool,
               wd: torch.Tensor | None = None) -> tuple[QuantizedWeight, GPTQStats]:
        """GPTQ of the stacked rows of the linears ``lins`` of group ``g``; ``H`` is factorised in
        place when ``consume``.

        If that factorisation fails, the retry needs the original Hessian: it is collected again
        (one more run of the block; rare) and solved on a copy, with damping raised as usual (``wd = W D``
        is never consumed, and the quantized-model inputs D pairs with are the ones collected again).
        """
        name = f"{ctx.spec.blocks}.{ctx.index}.{'+'.join(g)}"
        try:
            return gptq_quantize(_stacked(lins), H, self.scheme, self.config, scale_dtype=self.scale_dtype,
                                 name=name, timers=self.timers, consume_hessian=consume, consume_weight=True,
                                 wd=wd)
        except HessianConsumed:
            log.info("%s: collecting its Hessian again to retry with more damping", name)
        del H
        hdev = torch.device("cpu") if self.hessians_on_cpu else ctx.device
        obs = collect(ctx, lambda n, m: HessianObserver(m.in_features, hdev, self.timers), names=[g[0]])
        return gptq_quantize(_stacked(lins), obs[g[0]].H, self.scheme, self.config,  # type: ignore[attr-defined]
                             scale_dtype=self.scale_dtype, name=name, timers=self.timers, consume_weight=True,
                             wd=wd)  # the same X~ as the paired run's, so D still pairs with it


def _stacked(lins: list[nn.Linear]) -> torch.Tensor:
    """The weights of ``lins`` stacked along the rows, in a new float32 buffer ``(sum out, in)``
    (GPTQ's working copy: no bf16 concatenation on the way)."""
    W = torch.empty(sum(lin.out_features for lin in lins), lins[0].in_features, dtype=torch.float32,
                    device=lins[0].weight.device)
    r0 = 0
    for lin in lins:
        W[r0:r0 + lin.out_features].copy_(lin.weight.detach())
        r0 += lin.out_features
    return W
