"""Block-by-block calibration: the engine every calibrated method plugs into.

    tokens (n, T) --embed--> inputs of block 0, captured by a forward pre-hook (no module swap)
    for each decoder block i:
        move block i to the device
        method.quantize_block(ctx)      # may call ctx.run() with hooks to collect statistics
        write the dequantized weights into the block's linears (so what follows sees them)
        run block i again on its inputs -> inputs of block i+1
        move block i back

Memory on the device stays near one block plus the calibration activations ``n x T x hidden``.
The keyword arguments each block receives (rotary embeddings, attention masks, which differ per
layer type in e.g. Gemma 3) are recorded once by pre-hooks during one full forward of the first
sample, onloading one block at a time; every sample has the same length and no padding, so they
hold for every sample.

Hook points for methods (:class:`BlockContext`): ``ctx.run(keep_outputs)`` runs the block over
all calibration inputs; :func:`collect` registers observers on the inputs of the block's linears
for one such run (GPTQ Hessians, AWQ activation magnitudes, imatrix ``E[x^2]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.progress import progress as ticker
from lowbit.core.qweight import QuantizedWeight
from lowbit.models.archs import ArchSpec, block_linears, get_arch, get_blocks, require_mapping
from lowbit.pipeline.capture import capture_inputs
from lowbit.pipeline.checkpoint import BlockCheckpoint
from lowbit.pipeline.fused_norm import fused_norms
from lowbit.pipeline.replay import AttnReplay, attn_replay, maybe_active, saved_inputs, saving_attn
from lowbit.pipeline.transfer import HostCopier, copies_done, offload, onload, prewarm_pinned, stage, to_home, uploads

log = logging.getLogger(__name__)


class _StopBlock(Exception):
    """Raised by a statistics hook once the last input a run needs is seen: the rest of the
    block is not computed."""


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None:
        """Take a batch of inputs ``x (..., in)`` of one linear."""


@dataclass
class BlockContext:
    """What a method sees of one block; ``linears`` are in execution order."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]
    spec: ArchSpec
    device: torch.device
    inputs: list[torch.Tensor]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor] = field(default_factory=list)
    outputs_ready: bool = False  # set by a method whose own run already produced the outputs to pass on
    # the float model's inputs of this block, for methods with ``float_inputs`` (asymmetric
    # calibration); such a method sets ``fp_outputs``, the float model's inputs of the next block
    fp_inputs: list[torch.Tensor] | None = None
    fp_outputs: list[torch.Tensor] | None = None
    # the attention replayed from its output projection's saved inputs (lowbit.pipeline.replay), if the
    # architecture table names them; runs replay once a method saved them (``collect(save_attn=True)``)
    replay: AttnReplay | None = None
    # the scheme of each of ``linears`` (per-layer overrides of a recipe); a method quantizes linear ``n``
    # to ``schemes[n]`` (:meth:`scheme`), its own default scheme where the engine gave none
    schemes: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """The block's full module name, e.g. ``model.layers.3``."""
        return f"{self.spec.blocks}.{self.index}"

    def scheme(self, name: str, default: Any = None) -> Any:
        """The scheme linear ``name`` (within the block) is quantized to."""
        got = self.schemes.get(name, default)
        if got is None:
            raise LowbitError(f"{self.prefix}.{name}: no scheme was assigned to this linear")
        return got

    @torch.inference_mode()
    def run(self, keep_outputs: bool = False) -> None:
        """Run the block over every calibration input (hooks registered on it see each call)."""
        outs = self.forward_all(self.inputs, keep_outputs)
        if keep_outputs:
            self.outputs = outs

    @torch.inference_mode()
    def forward_all(self, inputs: list[torch.Tensor], keep_outputs: bool = True, src: str = "quantized"
                    ) -> list[torch.Tensor]:
        """The block's outputs for ``inputs`` (each back where its input lives), or none; the attention
        replays the saved inputs of ``src`` when there are some (``src="float"``: the float model's)."""
        outs = []
        zd = saved_inputs(self.replay, src, len(inputs), self.device)
        with maybe_active(self.replay, src) as rp:
            for x, xd, z in zip(inputs, uploads(inputs, self.device), zd, strict=True):
                if rp is not None:
                    rp.z, rp.src = z, src
                try:
                    y = self.block(xd, **self.kwargs)
                except _StopBlock:
                    if keep_outputs:
                        raise
                    continue
                y = y[0] if isinstance(y, tuple) else y
                if keep_outputs:
                    outs.append(to_home(y, x.device))
        return outs


class BlockMethod:
    """A quantization method at block granularity: the engine's whole contract with a method.

    A method is a (data)class deriving from this one; every attribute the engine reads is declared
    here with its default, so a new method states what it needs by overriding fields, never by
    growing attributes the engine would have to probe for.
    """

    #: the engine captures calibration inputs and passes each block's outputs on to the next
    needs_calibration: bool = False
    #: ``quantize_block`` leaves the dequantized weights in the block itself (the engine need not)
    writes_back: bool = False
    #: the method only collects statistics and returns no weights
    collect_only: bool = False
    #: fields holding what the method accumulates over the blocks (reports, search results): saved with
    #: each block's checkpoint and restored when a run resumes (:meth:`state`, :meth:`restore`)
    run_state: ClassVar[tuple[str, ...]] = ()

    @property
    def float_inputs(self) -> bool:
        """The engine also carries the float model's block inputs (``ctx.fp_inputs``) and the method
        sets ``ctx.fp_outputs`` (asymmetric calibration)."""
        return False

    @property
    def folds_scales(self) -> str | None:
        """The method's name if it folds per-channel scales into the module feeding each group of
        linears (AWQ, SmoothQuant): it needs an architecture table's mapping, which a table derived by
        the generic fallback lacks (:func:`check_mappings`, before any work); None otherwise."""
        return None

    def prepare(self, device: torch.device) -> None:
        """Called once before the calibration inputs are captured (e.g. compile kernels meanwhile)."""

    def host_sets(self, spec: ArchSpec) -> int:
        """Sets of per-sample activations the method keeps beside the engine's (for pinned prewarming)."""
        return 0

    def quantize_block(self, ctx: BlockContext) -> dict[str, Any]:
        """Quantize every linear of ``ctx.linears`` (names within the block) to ``ctx.scheme(name)``."""
        raise NotImplementedError

    @property
    def inner_method(self) -> BlockMethod | None:
        """The method this one hands each block's weights to (AWQ and SmoothQuant: RTN or GPTQ), whose
        state is checkpointed with this one's; None where there is none."""
        return None

    def state(self) -> dict[str, Any]:
        """What the method has accumulated so far (the :attr:`run_state` fields, and its inner method's),
        for a checkpoint."""
        out = {f: getattr(self, f) for f in self.run_state}
        inner = self.inner_method
        return {**out, "inner": None if inner is None else inner.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state` returned (a resumed run)."""
        for f in self.run_state:
            setattr(self, f, state[f])
        inner = self.inner_method
        if inner is not None:
            inner.restore(state["inner"])


#: which scheme a full linear name gets from a method, or None where it is not that method's
Assign = Callable[[str], Any]


@dataclass(frozen=True)
class Part:
    """One method of a quantization plan and the linears it owns (``assign``: full name -> scheme or None)."""

    method: BlockMethod
    assign: Assign


def _order(parts: list[Part]) -> list[Part]:
    """Run order within a block: the method that needs the float model's inputs first (its float copies
    are then truly float), then the calibrated ones, then those that need no data."""
    floats = [p for p in parts if p.method.float_inputs]
    if len(floats) > 1:
        raise LowbitError("at most one method of a plan may use asymmetric calibration (float inputs); "
                          "set asym_alpha 0 on the others")
    return floats + [p for p in parts if p.method.needs_calibration and not p.method.float_inputs] + \
        [p for p in parts if not p.method.needs_calibration]


def collect(ctx: BlockContext, make: Callable[[str, nn.Linear], Observer],
            names: list[str] | None = None, keep_outputs: bool = False, save_attn: bool = False
            ) -> dict[str, Observer]:
    """One run of the block with an observer on the input of each named linear.

    With ``keep_outputs`` the block's (unquantized) outputs of this run are kept and passed on
    to the next block unchanged (``ctx.outputs_ready``): one forward per block instead of two,
    for methods whose statistics should come from the float model (llama.cpp's imatrix does).
    With ``save_attn`` (only once the attention's q/k/v weights are final) the inputs of the
    attention's output projection are kept, and later runs replay the attention from them.
    """
    order = [n for n in ctx.linears if n in set(names or ctx.linears)]  # execution order
    obs = {n: make(n, ctx.linears[n]) for n in order}
    last = order[-1]

    def hook(name: str, o: Observer) -> Callable[..., None]:
        def fn(m: nn.Module, args: tuple) -> None:
            o.update(args[0])
            if name == last and not keep_outputs:
                raise _StopBlock  # nothing after this input is needed for this run
        return fn

    handles = [ctx.linears[n].register_forward_pre_hook(hook(n, o)) for n, o in obs.items()]
    try:
        with saving_attn(ctx.replay, ctx.inputs, ctx.device, "quantized", save_attn):
            ctx.run(keep_outputs=keep_outputs)
        ctx.outputs_ready = keep_outputs
    finally:
        for h in handles:
            h.remove()
    return obs


def _check_finite(prefix: str, linears: dict[str, nn.Linear]) -> None:
    """Refuse NaN/Inf weights. One sum per weight (no full-size temporary), read back once: run it
    where the weights are (a block just moved to the GPU checks there, in ~0.1 ms, instead of
    summing the whole model on the host first, about 3 s for an 8B model)."""
    sums = torch.stack([torch.sum(lin.weight, dtype=torch.float32) for lin in linears.values()])
    if bool(torch.isfinite(sums).all()):  # fast path
        return
    for n, lin in linears.items():
        if not torch.isfinite(lin.weight).all():
            bad = int((~torch.isfinite(lin.weight)).sum())
            raise LowbitError(f"{prefix}.{n}.weight has {bad} NaN/Inf values: the checkpoint is corrupt or was "
                              "saved after a diverged run; re-download or re-export it before quantizing")


def _write_back(qw: Any, lin: nn.Linear) -> None:
    """The dequantized weights into ``lin`` (in row bands where the weight type supports it)."""
    if isinstance(qw, QuantizedWeight):
        qw.to(lin.weight.device).dequantize_into(lin.weight.data)
    else:  # data-type weights (NF4, FP8, LLM.int8): whole-matrix dequantize
        lin.weight.data.copy_(qw.dequantize(lin.weight.dtype).to(lin.weight.device))


def _store(result: dict[str, QuantizedWeight], key: str, qw: QuantizedWeight) -> None:
    result[key] = qw.to("cpu")


def _prewarm(model: nn.Module, parts: list[Part], spec: ArchSpec, tokens: torch.Tensor | None) -> None:
    """Pin, in the background, the host memory the offloaded activations will take beyond the
    captured inputs: sets of ``n`` samples ``(1, T, hidden)`` each: inputs and outputs of a block
    (twice under asymmetric calibration), plus what the methods keep (``host_sets``: GPTQ's saved
    attention inputs), less the captured set."""
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if tokens is None or not isinstance(d, int):
        return
    twice = 2 if any(p.method.float_inputs for p in parts) else 1
    sets = 2 * twice + sum(p.method.host_sets(spec) for p in parts) - 1
    prewarm_pinned((1, tokens.shape[1], d), next(model.parameters()).dtype, sets * tokens.shape[0])


def _warm_forward(block: nn.Module, sample: torch.Tensor, kwargs: dict[str, Any], dev: torch.device) -> None:
    """One forward of the first block on its first calibration sample ``(1, T, hidden)``, output
    discarded, before any hook is on it: a process's first forward of a decoder layer on a GPU
    loads its kernels (bf16 GEMMs, attention, elementwise; 980 ms for a Llama-3-8B layer on an
    H200, 6 ms the second time). Run here, on the main thread, it overlaps what a method started
    in the background in ``prepare`` (GPTQ's warm-up solve) instead of following it."""
    with torch.no_grad():
        block(sample.to(dev, non_blocking=True), **kwargs)


def check_mappings(parts: list[Part], spec: ArchSpec) -> None:
    """Refuse, before any work, a scale-folding method on a table without a mapping (a derived one)."""
    for p in parts:
        if p.method.folds_scales:
            require_mapping(spec, p.method.folds_scales)


def as_parts(method: BlockMethod | Part | list[Part]) -> list[Part]:
    """A plan's parts; a lone method owns every linear, at its own ``scheme`` (None for methods without one)."""
    if isinstance(method, Part):
        return [method]
    if isinstance(method, list):
        return method
    scheme = getattr(method, "scheme", None)  # noqa: B009 -- methods without a scheme get none
    return [Part(method, lambda name: scheme if scheme is not None else True)]


def run_blockwise(model: nn.Module, method: BlockMethod | Part | list[Part], tokens: torch.Tensor | None = None,
                  device: str | torch.device = "cpu", progress: bool = True, offload_activations: bool = False,
                  warm_forward: bool | None = None, fuse_norms: bool = True,
                  checkpoint: BlockCheckpoint | None = None) -> dict[str, Any]:
    """Quantize every linear of every decoder block of ``model``; returns ``{full name: QuantizedWeight}``.

    ``method`` is one block method owning every linear, or a plan: :class:`Part` s, each a method and
    the linears it owns with their schemes (per-layer overrides; a linear no part owns stays 16-bit).
    Within a block the parts run in :func:`_order`; with more than one, the block's outputs are
    computed afresh once every part is done. The model's linears are left holding the dequantized
    weights (a fake-quantized model); the result lives on the CPU. ``warm_forward`` (default: on a
    GPU with calibration) runs block 0 once on its first sample before the methods see it
    (:func:`_warm_forward`); it changes no result. ``fuse_norms`` runs a block's RMSNorms of the known
    classes (Llama and Gemma styles) as one Triton kernel each while it is on a GPU
    (:mod:`lowbit.pipeline.fused_norm`; the eager arithmetic, to two ulp). ``checkpoint`` saves each
    finished block (:mod:`lowbit.pipeline.checkpoint`) and, when it resumes, restores the blocks before
    its saved point and starts after them: the result is the same, byte for byte.
    """
    parts = _order(as_parts(method))
    spec = get_arch(model)
    check_mappings(parts, spec)
    dev = torch.device(device)
    blocks = get_blocks(model, spec)
    early = dev.type == "cpu"  # a CPU run checks every weight first; else each block, once on the device
    for i, block in enumerate(blocks if early else []):
        _check_finite(f"{spec.blocks}.{i}", block_linears(block, spec, i))
    calibrated = any(p.method.needs_calibration for p in parts)
    if calibrated and (tokens is None or tokens.numel() == 0):
        raise LowbitError("this method needs calibration tokens; pass --calib (e.g. c4 or a text file)")
    for p in parts:
        p.method.prepare(dev)  # e.g. compile kernels in the background while the inputs are captured
    offload_acts = offload_activations and dev.type != "cpu"
    if calibrated and offload_acts:
        _prewarm(model, parts, spec, tokens)
    if calibrated:
        assert tokens is not None
        hidden, kwargs = capture_inputs(model, tokens, spec, dev, offload=offload_acts)
    else:
        hidden, kwargs = [], [{} for _ in blocks]
    fp_hidden = hidden if calibrated and any(p.method.float_inputs for p in parts) else None
    result: dict[str, Any] = {}
    first = 0
    methods = [p.method for p in parts]
    resumed = checkpoint.begin(tokens, list(blocks), spec.blocks, methods) if checkpoint is not None else None
    if resumed is not None:
        first, home = resumed.next_block, (hidden[0].device if hidden else dev)
        result.update(resumed.weights)
        hidden = [h.to(home) for h in resumed.hidden]
        fp_hidden = None if resumed.fp_hidden is None else [h.to(home) for h in resumed.fp_hidden]
    warm = (dev.type == "cuda" if warm_forward is None else warm_forward) and calibrated and bool(hidden)
    copier = HostCopier(dev)
    norms = ExitStack()
    try:
        with torch.no_grad(), ticker(f"quantizing {len(blocks)} blocks", len(blocks), progress) as bar:
            staged = copier.submit(partial(stage, blocks[first])) if copier.cuda and first < len(blocks) else None
            for i, block in enumerate(blocks):
                if i < first:  # restored from the checkpoint
                    bar.advance()
                    continue
                homes = onload(block, dev, staged.result() if staged is not None else None)
                norms.enter_context(fused_norms(block, dev, on=fuse_norms))  # left by norms.close()
                nxt = i + 1 < len(blocks) and copier.cuda
                staged = copier.submit(partial(stage, blocks[i + 1])) if nxt else None  # pinned, meanwhile
                linears = block_linears(block, spec, i)
                if not early:
                    _check_finite(f"{spec.blocks}.{i}", linears)
                copies_done(dev)  # activations written to the host by the previous block have landed
                if i == first and warm:
                    _warm_forward(block, hidden[0], kwargs[i], dev)
                hidden, fp_hidden = _quantize_block(parts, i, block, linears, spec, dev, hidden, kwargs[i],
                                                    fp_hidden, result, copier, calibrated)
                norms.close()
                offload(block, homes, copier)
                if checkpoint is not None:
                    copier.wait()  # this block's weights are on the host
                    own = {k: v for k, v in result.items() if k.startswith(f"{spec.blocks}.{i}.")}
                    checkpoint.save(i, block, own, hidden, fp_hidden, methods)
                bar.advance()
                log.debug("block %d quantized", i)
        copier.wait()
    finally:
        norms.close()
        copier.close()
    return result


def _quantize_block(parts: list[Part], i: int, block: nn.Module, linears: dict[str, nn.Linear], spec: ArchSpec,
                    dev: torch.device, hidden: list[torch.Tensor], kwargs: dict[str, Any],
                    fp_hidden: list[torch.Tensor] | None, result: dict[str, Any], copier: HostCopier,
                    calibrated: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Every part's linears of block ``i`` quantized (results queued into ``result``); returns the next
    block's inputs (quantized model, and float model when carried)."""
    prefix = f"{spec.blocks}.{i}"
    owned = []
    for p in parts:
        schemes = {n: p.assign(f"{prefix}.{n}") for n in linears}
        schemes = {n: s for n, s in schemes.items() if s is not None and s is not False}
        owned.append((p, schemes))
    fp_next: list[torch.Tensor] | None = None
    if fp_hidden is not None and not any(sch for p, sch in owned if p.method.float_inputs):
        # the float model's next inputs, before any part of this block changes a weight
        fp_next = BlockContext(i, block, {}, spec, dev, hidden, kwargs).forward_all(fp_hidden)
    active = [(p, sch) for p, sch in owned if sch]
    last: BlockContext | None = None
    for p, sch in active:
        m = p.method
        ctx = BlockContext(i, block, {n: lin for n, lin in linears.items() if n in sch}, spec, dev, hidden, kwargs,
                           fp_inputs=fp_hidden if m.float_inputs else None, replay=attn_replay(block, spec, i),
                           schemes={n: s for n, s in sch.items() if s is not True})
        qws = m.quantize_block(ctx)
        if m.float_inputs:
            if ctx.fp_outputs is None:
                raise LowbitError(f"block {i}: a method with float_inputs must set ctx.fp_outputs")
            fp_next = ctx.fp_outputs
        missing = set(ctx.linears) - set(qws)
        if missing and not m.collect_only:
            raise LowbitError(f"block {i}: method returned no weight for {sorted(missing)}")
        for n, qw in qws.items():
            if not m.writes_back:
                _write_back(qw, ctx.linears[n])
            copier.submit(partial(_store, result, f"{prefix}.{n}", qw))
        last = ctx
    if not calibrated:
        return hidden, fp_next
    if last is None or len(active) > 1:  # outputs after every part, with the real attention
        last = BlockContext(i, block, linears, spec, dev, hidden, kwargs)
    if not last.outputs_ready:
        last.run(keep_outputs=True)
    return last.outputs, fp_next
