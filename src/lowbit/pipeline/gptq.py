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
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn

from lowbit.core.errors import SchemeError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptaq import cross_product
from lowbit.methods.gptq import GPTQConfig, GPTQStats, HessianConsumed, gptq_quantize
from lowbit.models.archs import ArchSpec
from lowbit.pipeline.blockwise import BlockContext, BlockMethod, collect
from lowbit.pipeline.distributed import broadcast_object, broadcast_qweight, sum_weighted, world
from lowbit.pipeline.hessian import HessianObserver, Timeline, tick, tock
from lowbit.pipeline.paired import collect_paired, float_weights
from lowbit.pipeline.transfer import to_host_async

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One run of a block (two, paired, under asymmetric calibration) and the groups solved after it."""

    groups: tuple[tuple[str, ...], ...]  # groups of linears sharing an input, in execution order
    asym: frozenset[str]  # first linears of the groups aimed at the float model's output (D collected)
    float_outputs: bool  # the float runs go on to the block's output (the last paired stage)


def _own(t: torch.Tensor, shared: bool) -> torch.Tensor:
    """``t`` in host memory of its own: an async pinned copy of a device tensor, a clone of a host
    view that shares its storage with other results (``shared``), else ``t`` itself."""
    if t.device.type != "cpu":
        return to_host_async(t)
    return t.clone() if shared else t


def _to_host(q: QuantizedWeight, shared: bool) -> QuantizedWeight:
    """``q`` with its tensors in host memory of their own (:func:`_own`)."""
    return QuantizedWeight(_own(q.codes, shared), _own(q.scales, shared), _own(q.zeros, shared), q.scheme,
                           None if q.g_idx is None else _own(q.g_idx, shared))


@dataclass
class GPTQMethod(BlockMethod):
    """GPTQ per block (true-sequential by default); each group of linears sharing an input is solved
    with one Hessian, to the scheme the engine assigned its linears (``ctx.scheme``; they must agree)."""

    scheme: QuantScheme
    config: GPTQConfig = field(default_factory=GPTQConfig)
    true_sequential: bool = True
    hessians_on_cpu: bool = False
    scale_dtype: torch.dtype = torch.bfloat16
    needs_calibration: bool = True
    stats: dict[str, GPTQStats] = field(default_factory=dict)
    run_state: ClassVar[tuple[str, ...]] = ("stats",)
    timers: dict[str, float] | None = None  # phase -> seconds (synchronising) when a dict is given
    # later runs of a block replay its attention from o_proj's inputs, kept by the stage that starts at o_proj
    # (q/k/v final by then): same results, about a third less forward time (lowbit.pipeline.replay)
    replay_attention: bool = True
    timeline: Timeline | None = None  # non-synchronising phase marks (bench/gptq_speed.py --timeline)
    _warm: threading.Thread | None = field(default=None, init=False, repr=False)
    writes_back = True  # quantize_block leaves the dequantized weights in the block (the engine need not)

    @property
    def float_inputs(self) -> bool:
        """Asymmetric calibration: the engine also carries the float model's block inputs."""
        return self.config.asym_alpha > 0

    def plan(self, spec: ArchSpec, owned: set[str] | None = None) -> tuple[list[Stage], tuple[str, ...]]:
        """The runs of one block, in order, and the linears whose float weights must be copied.

        True-sequential: one stage per group (one stage for all without it). Under asymmetric
        calibration a stage holding an in-scope group runs paired (float and quantized passes); the
        last paired stage's float runs go on to the block's output (the float model's next input),
        so only the linears quantized *before* it need a float copy (the others are still float
        when it runs). ``asym_scope="skip-last"`` leaves out the last group (down_proj): no D
        ``(inter, inter)`` and no float run up to it, so its stage costs what plain GPTQ's does;
        ``"residual"`` keeps only the norm-fed groups (q/k/v, gate/up). ``owned``: the linears this method
        quantizes in the block (default all; a group is the method's when its first linear is); the
        scope still counts the block's groups, so ``skip-last`` leaves out down_proj whoever owns it.
        """
        mine = [g for g in spec.groups if owned is None or g.linears[0] in owned]
        groups = [g.linears for g in mine]
        stage_groups = [[g] for g in groups] if self.true_sequential else [groups]
        asym: set[str] = set()
        if self.float_inputs:
            scope = self.config.asym_scope
            asym = {g.linears[0] for i, g in enumerate(spec.groups)
                    if scope == "all" or (scope == "skip-last" and i < len(spec.groups) - 1)
                    or (scope == "residual" and g.prev != "" and g.prev not in spec.linears)}
            if not asym:
                raise SchemeError(f"{spec.name}: asymmetric calibration with scope {scope!r} leaves no group of "
                                  "linears to aim at the float output; use scope 'all'")
        paired = [i for i, sg in enumerate(stage_groups) if any(g[0] in asym for g in sg)]
        last = paired[-1] if paired else -1
        stages = [Stage(tuple(tuple(g) for g in sg), frozenset(g[0] for g in sg if g[0] in asym), i == last)
                  for i, sg in enumerate(stage_groups)]
        copies = tuple(n for sg in stage_groups[:max(last, 0)] for g in sg for n in g)
        return stages, copies

    def host_sets(self, spec: ArchSpec) -> int:
        """Sets of per-sample activations this method keeps beside the engine's: the attention
        replay's saved inputs, of the quantized model and (asymmetric calibration) the float one."""
        return (1 + self.float_inputs) if self.replay_attention and spec.attn_out is not None else 0

    def prepare(self, device: torch.device) -> None:
        """Start a small GPTQ solve on ``device`` in the background (called by the engine before it
        captures the calibration inputs): a process's first solve on a GPU compiles and loads the
        Triton column kernel and initialises the solver libraries, 0.85 s with Triton's cache warm
        and 1.96 s with it empty on an H200, which then overlaps the capture instead of block 0.
        The first real solve waits for it (two threads compiling the same kernel would only
        duplicate the work)."""
        if device.type != "cuda" or self._warm is not None:
            return
        cfg = dataclasses.replace(self.config, cuda_graphs=False, search=False, search_guard=0, search_power=1.0)

        def solve() -> None:
            try:
                with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
                    # 2048 columns: groups of 128 give 16 a row, the divisibility the real layers' strides have
                    g = torch.Generator(device).manual_seed(0)
                    x = torch.randn(4096, 2048, device=device, generator=g)
                    w = torch.randn(32, 2048, device=device, generator=g)
                    wd = 0.01 * w if cfg.asym_alpha > 0 else None
                    gptq_quantize(w, x.T @ x / 4096, self.scheme, cfg, scale_dtype=self.scale_dtype,
                                  name="warm-up", consume_hessian=True, consume_weight=True, wd=wd)
                    torch.cuda.current_stream(device).synchronize()
            except Exception as e:  # a warm-up only: the real solves report real errors
                log.warning("GPTQ warm-up failed (%s); the first block compiles and loads the kernels instead", e)

        self._warm = threading.Thread(target=solve, name="lowbit-gptq-warm-up", daemon=True)
        self._warm.start()

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        if self._warm is not None:
            self._warm.join()
        hdev = torch.device("cpu") if self.hessians_on_cpu else ctx.device
        stages, copies = self.plan(ctx.spec, set(ctx.linears))
        schemes = self._group_schemes(ctx, stages)
        size = world()[1]
        solved = 0
        fw: dict[str, torch.Tensor] | None = None
        if self.float_inputs:  # float copies of the linears quantized before the last paired run
            assert ctx.fp_inputs is not None
            if not any(st.float_outputs for st in stages):  # none of this block's groups is aimed: the
                ctx.fp_outputs = ctx.forward_all(ctx.fp_inputs)  # float outputs now, before any change
            fw = float_weights(ctx, copies)
        top = self.config.search_guard if self.config.search else 0  # tokens kept for the search guard
        out: dict[str, QuantizedWeight] = {}
        proj = ctx.spec.attn_out[1] if ctx.spec.attn_out and self.replay_attention else None
        for stage in stages:
            t0 = tick(self.timers, ctx.device)
            firsts = [g[0] for g in stage.groups]
            if self.timeline is not None:
                self.timeline.mark(f"forward {'+'.join(f.split('.')[-1] for f in firsts)}"
                                   + (" (paired)" if stage.asym else ""))
            save = proj is not None and proj in stage.groups[0]  # every group before it is final
            obs: dict[str, Any]
            if not stage.asym:  # (the stage with the float outputs is paired: it is the last with asym)
                obs = collect(ctx, lambda n, lin: HessianObserver(lin.in_features, hdev, self.timers,
                                                                  keep_top=top), names=firsts, save_attn=save)
            else:
                assert fw is not None

                def paired(n: str, lin: nn.Linear, asym: frozenset[str] = stage.asym) -> HessianObserver:
                    return HessianObserver(lin.in_features, hdev, self.timers, cross=n in asym, keep_top=top)

                obs = collect_paired(ctx, paired, firsts, fw, float_outputs=stage.float_outputs, save_attn=save)
                if stage.float_outputs:
                    fw = None  # no later stage runs the float block
            tock(self.timers, "forward+hessian", t0, ctx.device)
            for g in stage.groups:
                if self.timeline is not None:
                    self.timeline.mark(f"solve {'+'.join(n.split('.')[-1] for n in g)}")
                # popped, not held here: _solve_group frees D before the solve and H after it
                self._solve_group(ctx, g, schemes[g[0]], cast(HessianObserver, obs.pop(g[0])), hdev,
                                  solved % size, out)
                solved += 1
            del obs
        if self.timeline is not None:
            self.timeline.mark("output pass, moves (engine)")
        return out

    def _group_schemes(self, ctx: BlockContext, stages: list[Stage]) -> dict[str, QuantScheme]:
        """The scheme of each group of ``stages`` (by first linear); a group's linears share one Hessian
        and one solve, so they must all be this method's, with one scheme."""
        out = {}
        for st in stages:
            for g in st.groups:
                got = {n: ctx.schemes.get(n, self.scheme) if n in ctx.linears else None for n in g}
                if len(set(got.values())) != 1 or None in got.values():
                    raise SchemeError(f"{ctx.prefix}: {', '.join(g)} share one input and are solved together by "
                                      f"GPTQ; give them one scheme and method (got {got})")
                out[g[0]] = got[g[0]]
        return out  # type: ignore[return-value]

    def _solve_group(self, ctx: BlockContext, g: tuple[str, ...], scheme: QuantScheme, o: HessianObserver,
                     hdev: torch.device, owner: int, out: dict[str, QuantizedWeight]) -> None:
        """GPTQ of group ``g`` from its observer ``o`` (on rank ``owner``, broadcast to the others); the
        dequantized weights written back, the results put in ``out`` (host tensors)."""
        rank, size = world()
        H, _ = sum_weighted(o.H, o.n, inplace=True)  # the observer's own buffers: o is dropped below
        D = None if o.D is None else sum_weighted(o.D, o.n, inplace=True)[0]
        top_rows = o.top
        del o
        lins = [ctx.linears[n] for n in g]
        # GPTAQ needs D only through W D (out, in), on the solving rank: D (in, in) is freed before the solve
        WD = None if D is None or owner != rank else cross_product(_stacked(lins), D)
        del D
        # the linears of a group share H: one solve over their stacked rows (rows are independent),
        # written straight into the float32 working copy GPTQ consumes
        shape = (sum(lin.out_features for lin in lins), lins[0].in_features)
        qw, st = None, None
        if owner == rank:
            # one rank cannot run the block again alone to re-collect H for a retry: under several ranks the
            # retry's source is a host copy of the summed H (queued before the in-place factorisation), so
            # H is still consumed and the owner's device holds one in x in buffer, as a single process does
            backup = _host_backup(H) if size > 1 and H.device == lins[0].weight.device else None
            if top_rows.shape[0]:
                qw, st = self._guarded_solve(ctx, g, scheme, lins, H, top_rows, wd=WD, backup=backup)
            else:
                qw, st = self._solve(ctx, g, scheme, lins, H, wd=WD, backup=backup)
            del backup
        del H, WD
        dynamic = self.config.act_order and not self.config.static_groups
        qw = broadcast_qweight(qw, owner, shape, scheme,  # type: ignore[arg-type]
                               self.scale_dtype, hdev, dynamic)
        st = broadcast_object(st, owner)  # type: ignore[assignment]
        assert isinstance(st, GPTQStats) and st.row_loss is not None
        r0 = 0
        t0 = tick(self.timers, ctx.device)
        for n, lin in zip(g, lins, strict=True):
            r1 = r0 + lin.out_features
            part = qw if len(g) == 1 else QuantizedWeight(
                qw.codes[r0:r1], qw.scales[r0:r1], qw.zeros[r0:r1], qw.scheme, qw.g_idx)
            part.dequantize_into(lin.weight.data)
            # results leave the device at once (later stages' peaks hold no codes); row slices are
            # contiguous, so each linear gets host tensors of its own without a device clone. (Copying them
            # from a background thread instead gained nothing on the H200, 52.6 s vs 52.0 s for plain GPTQ:
            # the pinned allocations cost what they cost; lowbit.cudaenv makes them cheaper.)
            out[n] = _to_host(part, len(g) > 1)
            self.stats[f"{ctx.spec.blocks}.{ctx.index}.{n}"] = GPTQStats(
                float(st.row_loss[r0:r1].sum()), st.damp, st.dead_columns, searched=st.searched)
            r0 = r1
        tock(self.timers, "write-back", t0, ctx.device)

    def _guarded_solve(self, ctx: BlockContext, g: tuple[str, ...], scheme: QuantScheme, lins: list[nn.Linear],
                       H: torch.Tensor,
                       top: torch.Tensor, wd: torch.Tensor | None = None, backup: torch.Tensor | None = None
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
        q0, s0 = gptq_quantize(_stacked(lins), H, scheme, plain, scale_dtype=self.scale_dtype, name=name,
                               timers=self.timers, consume_weight=True, wd=wd)
        q1, s1 = self._solve(ctx, g, scheme, lins, H, wd=wd, backup=backup)
        W = _stacked(lins)
        x = top.to(device=W.device, dtype=torch.float32)
        worst = [float(((W - q.dequantize().to(W)) @ x.T).square().sum(0).max()) for q in (q0, q1)]
        keep = worst[1] <= worst[0]
        log.info("%s: clipping search %s (loss %.4g -> %.4g, worst top-token error %.4g -> %.4g)", name,
                 "kept" if keep else "dropped", s0.loss, s1.loss, worst[0], worst[1])
        q, st = (q1, s1) if keep else (q0, s0)
        st.searched = keep
        return q, st

    def _solve(self, ctx: BlockContext, g: tuple[str, ...], scheme: QuantScheme, lins: list[nn.Linear],
               H: torch.Tensor,
               wd: torch.Tensor | None = None, backup: torch.Tensor | None = None
               ) -> tuple[QuantizedWeight, GPTQStats]:
        """GPTQ of the stacked rows of the linears ``lins`` of group ``g``; ``H`` is factorised in
        place (no second ``in x in`` buffer on the device).

        If that factorisation fails, the retry needs the original Hessian: from ``backup`` (a host
        copy, under several ranks) or else collected again (one more run of the block; rare), and
        solved on a copy, with damping raised as usual (``wd = W D`` is never consumed, and the
        quantized-model inputs D pairs with are the ones collected again).
        """
        name = f"{ctx.spec.blocks}.{ctx.index}.{'+'.join(g)}"
        try:
            return gptq_quantize(_stacked(lins), H, scheme, self.config, scale_dtype=self.scale_dtype,
                                 name=name, timers=self.timers, consume_hessian=True, consume_weight=True,
                                 wd=wd)
        except HessianConsumed:
            pass
        del H
        if backup is not None:
            log.info("%s: retrying from the host copy of its Hessian with more damping", name)
            return gptq_quantize(_stacked(lins), backup, scheme, self.config, scale_dtype=self.scale_dtype,
                                 name=name, timers=self.timers, consume_weight=True, wd=wd)
        log.info("%s: collecting its Hessian again to retry with more damping", name)
        hdev = torch.device("cpu") if self.hessians_on_cpu else ctx.device
        obs = collect(ctx, lambda n, m: HessianObserver(m.in_features, hdev, self.timers), names=[g[0]])
        return gptq_quantize(_stacked(lins), obs[g[0]].H, scheme, self.config,  # type: ignore[attr-defined]
                             scale_dtype=self.scale_dtype, name=name, timers=self.timers, consume_weight=True,
                             wd=wd)  # the same X~ as the paired run's, so D still pairs with it


def _host_backup(H: torch.Tensor) -> torch.Tensor:
    """A copy of ``H`` in host memory: pinned and queued on the current stream for a CUDA ``H`` (so it
    is taken before any later in-place work on that stream; read it only through that stream or after
    a synchronisation), a clone for a host ``H``."""
    return to_host_async(H) if H.is_cuda else H.clone()


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
