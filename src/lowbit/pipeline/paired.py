"""Statistics that pair each token's input in the float model with its input in the quantized one.

Asymmetric calibration (:mod:`lowbit.methods.gptaq`) needs, for the linears of one group,
``D = (X - X~)^T X~``: ``X`` the inputs the *float* model gives them, ``X~`` the inputs they see in
the partly-quantized model. Per calibration sample the block runs twice: once with its original
(float) weights on the float model's block input, where hooks keep the named linears' inputs,
then with its current weights on the quantized model's block input, where each observer gets
``update(x~, x)``. Both runs stop after the last input needed (except, when asked, the float run,
which then goes on to the block's output: the float model's input of the next block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

from lowbit.pipeline.blockwise import BlockContext, _StopBlock
from lowbit.pipeline.replay import maybe_active, saved_inputs, saving_attn
from lowbit.pipeline.transfer import to_home, uploads


class PairedObserver(Protocol):
    def update(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        """Take a batch of inputs ``x (..., in)`` of one linear and the float model's ``x_float``."""


def float_weights(ctx: BlockContext, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Copies of the weights of the linears ``names`` (default: all) before any is quantized; the
    float runs of :func:`collect_paired` take the others' current weights (still float)."""
    keep = set(ctx.linears) if names is None else set(names)
    return {n: lin.weight.detach().clone() for n, lin in ctx.linears.items() if n in keep}


def collect_paired(ctx: BlockContext, make: Callable[[str, nn.Linear], PairedObserver], names: list[str],
                   weights: dict[str, torch.Tensor], float_outputs: bool = False, save_attn: bool = False
                   ) -> dict[str, PairedObserver]:
    """One paired run of the block per sample (float weights on ``ctx.fp_inputs``, then the current
    weights on ``ctx.inputs``) with an observer on the inputs of each named linear. ``weights`` holds
    the float weights of the linears already quantized; the others' current weights are float.

    With ``float_outputs`` the float runs go through the whole block and their outputs, the float
    model's inputs of the next block, are left in ``ctx.fp_outputs`` (each where its input lives):
    no separate float forward of the block is needed. With ``save_attn`` both passes keep the inputs
    of the attention's output projection (:func:`~lowbit.pipeline.replay.saving_attn`), and later runs
    of either model replay the attention from them.
    """
    if ctx.fp_inputs is None:
        raise ValueError("paired statistics need the float model's block inputs (ctx.fp_inputs)")
    order = [n for n in ctx.linears if n in set(names)]  # execution order
    obs = {n: make(n, ctx.linears[n]) for n in order}
    last = order[-1]
    stash: dict[str, torch.Tensor] = {}
    float_pass = [True]

    def hook(name: str, o: PairedObserver) -> Callable[..., None]:
        def fn(m: nn.Module, args: tuple) -> None:
            if float_pass[0]:
                stash[name] = args[0].detach()
            else:
                o.update(args[0], stash.pop(name))
            if name == last and not (float_pass[0] and float_outputs):
                raise _StopBlock
        return fn

    current = {n: lin.weight.data for n, lin in ctx.linears.items()}
    floats = {n: weights.get(n, w) for n, w in current.items()}

    def use(ws: dict[str, torch.Tensor]) -> None:
        for n, lin in ctx.linears.items():
            lin.weight.data = ws[n]

    handles = [ctx.linears[n].register_forward_pre_hook(hook(n, o)) for n, o in obs.items()]
    outs: list[torch.Tensor] = []
    n = len(ctx.inputs)
    zfs, zqs = (saved_inputs(ctx.replay, src, n, ctx.device) for src in ("float", "quantized"))
    try:
        with (torch.inference_mode(),  # the observers were made outside it: they stay updatable
              saving_attn(ctx.replay, ctx.inputs, ctx.device, "float", save_attn, active=lambda: float_pass[0]),
              saving_attn(ctx.replay, ctx.inputs, ctx.device, "quantized", save_attn, active=lambda: not float_pass[0]),
              maybe_active(ctx.replay, "float", "quantized") as rp):
            for home, xq, xf, zfd, zqd in zip(ctx.fp_inputs, uploads(ctx.inputs, ctx.device),
                                              uploads(ctx.fp_inputs, ctx.device), zfs, zqs, strict=True):
                for is_float, x in ((True, xf), (False, xq)):
                    float_pass[0] = is_float
                    use(floats if is_float else current)
                    if rp is not None:
                        rp.z, rp.src = (zfd, "float") if is_float else (zqd, "quantized")
                    try:
                        y = ctx.block(x, **ctx.kwargs)
                    except _StopBlock:
                        continue
                    y = y[0] if isinstance(y, tuple) else y
                    outs.append(to_home(y, home.device))
    finally:
        use(current)
        for h in handles:
            h.remove()
    if float_outputs:
        ctx.fp_outputs = outs
    return obs
