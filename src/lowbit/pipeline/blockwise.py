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
from typing import Any, Protocol

import torch
from rich.progress import Progress
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.qweight import QuantizedWeight
from lowbit.models.archs import ArchSpec, block_linears, get_arch, get_blocks
from lowbit.pipeline.capture import capture_inputs
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


class BlockMethod(Protocol):
    """A quantization method at block granularity."""

    needs_calibration: bool

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        """Quantize every linear of ``ctx.linears`` (names within the block)."""


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
        with saving_attn(ctx, "quantized", save_attn):
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


def _prewarm(model: nn.Module, method: BlockMethod, spec: ArchSpec, tokens: torch.Tensor | None) -> None:
    """Pin, in the background, the host memory the offloaded activations will take beyond the
    captured inputs: sets of ``n`` samples ``(1, T, hidden)`` each: inputs and outputs of a block
    (twice under asymmetric calibration), plus what the method keeps (``host_sets``: GPTQ's saved
    attention inputs), less the captured set."""
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if tokens is None or not isinstance(d, int):
        return
    twice = 2 if getattr(method, "float_inputs", False) else 1
    extra = getattr(method, "host_sets", None)
    sets = 2 * twice + (extra(spec) if extra is not None else 0) - 1
    prewarm_pinned((1, tokens.shape[1], d), next(model.parameters()).dtype, sets * tokens.shape[0])


def _warm_forward(block: nn.Module, sample: torch.Tensor, kwargs: dict[str, Any], dev: torch.device) -> None:
    """One forward of the first block on its first calibration sample ``(1, T, hidden)``, output
    discarded, before any hook is on it: a process's first forward of a decoder layer on a GPU
    loads its kernels (bf16 GEMMs, attention, elementwise; 980 ms for a Llama-3-8B layer on an
    H200, 6 ms the second time). Run here, on the main thread, it overlaps what a method started
    in the background in ``prepare`` (GPTQ's warm-up solve) instead of following it."""
    with torch.no_grad():
        block(sample.to(dev, non_blocking=True), **kwargs)


def run_blockwise(model: nn.Module, method: BlockMethod, tokens: torch.Tensor | None = None,
                  device: str | torch.device = "cpu", progress: bool = True, offload_activations: bool = False,
                  warm_forward: bool | None = None, fuse_norms: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize every linear of every decoder block of ``model``; returns ``{full name: QuantizedWeight}``.

    The model's linears are left holding the dequantized weights (a fake-quantized model);
    the result lives on the CPU. ``warm_forward`` (default: on a GPU with calibration) runs block 0
    once on its first sample before the method sees it (:func:`_warm_forward`); it changes no result.
    ``fuse_norms`` runs a block's RMSNorms of the known classes (Llama and Gemma styles) as one Triton
    kernel each while it is on a GPU (:mod:`lowbit.pipeline.fused_norm`; the eager arithmetic, to two ulp).
    """
    spec = get_arch(model)
    dev = torch.device(device)
    blocks = get_blocks(model, spec)
    early = dev.type == "cpu"  # a CPU run checks every weight first; else each block, once on the device
    for i, block in enumerate(blocks if early else []):
        _check_finite(f"{spec.blocks}.{i}", block_linears(block, spec, i))
    calibrated = method.needs_calibration
    if calibrated and (tokens is None or tokens.numel() == 0):
        raise LowbitError("this method needs calibration tokens; pass --calib (e.g. c4 or a text file)")
    prepare = getattr(method, "prepare", None)
    if prepare is not None:
        prepare(dev)  # e.g. compile kernels in the background while the inputs are captured
    offload_acts = offload_activations and dev.type != "cpu"
    if calibrated and offload_acts:
        _prewarm(model, method, spec, tokens)
    if calibrated:
        assert tokens is not None
        hidden, kwargs = capture_inputs(model, tokens, spec, dev, offload=offload_acts)
    else:
        hidden, kwargs = [], [{} for _ in blocks]
    fp_hidden = hidden if calibrated and getattr(method, "float_inputs", False) else None
    result: dict[str, QuantizedWeight] = {}
    warm = (dev.type == "cuda" if warm_forward is None else warm_forward) and calibrated and bool(hidden)
    copier = HostCopier(dev)
    norms = ExitStack()
    try:
        with torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"quantizing {len(blocks)} blocks", total=len(blocks))
            staged = copier.submit(partial(stage, blocks[0])) if copier.cuda else None
            for i, block in enumerate(blocks):
                homes = onload(block, dev, staged.result() if staged is not None else None)
                norms.enter_context(fused_norms(block, dev, on=fuse_norms))  # left by norms.close()
                nxt = i + 1 < len(blocks) and copier.cuda
                staged = copier.submit(partial(stage, blocks[i + 1])) if nxt else None  # pinned, meanwhile
                linears = block_linears(block, spec, i)
                if not early:
                    _check_finite(f"{spec.blocks}.{i}", linears)
                copies_done(dev)  # activations written to the host by the previous block have landed
                if i == 0 and warm:
                    _warm_forward(block, hidden[0], kwargs[0], dev)
                ctx = BlockContext(i, block, linears, spec, dev, hidden, kwargs[i], fp_inputs=fp_hidden,
                                   replay=attn_replay(block, spec, i))
                qws = method.quantize_block(ctx)
                if fp_hidden is not None:
                    if ctx.fp_outputs is None:
                        raise LowbitError(f"block {i}: a method with float_inputs must set ctx.fp_outputs")
                    fp_hidden = ctx.fp_outputs
                missing = set(ctx.linears) - set(qws)
                if missing and not getattr(method, "collect_only", False):
                    raise LowbitError(f"block {i}: method returned no weight for {sorted(missing)}")
                for n, qw in qws.items():
                    lin = ctx.linears[n]
                    if not getattr(method, "writes_back", False):
                        _write_back(qw, lin)
                    copier.submit(partial(_store, result, f"{spec.blocks}.{i}.{n}", qw))
                if calibrated:
                    if not ctx.outputs_ready:
                        ctx.run(keep_outputs=True)
                    hidden = ctx.outputs
                norms.close()
                offload(block, homes, copier)
                bar.advance(task)
                log.debug("block %d quantized", i)
        copier.wait()
    finally:
        norms.close()
        copier.close()
    return result
