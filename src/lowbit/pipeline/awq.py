"""AWQ as a block method: search (scales, clips), apply (fold + clamp), then quantize (RTN or GPTQ).

Per block, one run of the block over the calibration inputs (already passed through the quantized
blocks before it) records, for every group of linears of the architecture table, ``mean_t |x_tj|``
over all tokens and a strided sample of at most ``max_tokens`` input rows. Then, in execution
order, each foldable group gets its scales (:func:`lowbit.methods.awq.search_scales`), folded into
the feeding norm or linear (:func:`lowbit.pipeline.scaling.fold_scales`); then each linear but
q/k (whose outputs meet in a softmax, as AutoAWQ) gets its clipping range. Finally the block is
quantized by the inner method: RTN, or GPTQ on the scaled and clipped weights (``awq+gptq``).

Search and apply are separate: :class:`AWQResult` holds every scale and clip by full module name;
it saves to / loads from a safetensors file, and a method built with ``preset=`` applies it
instead of searching.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lowbit.core.errors import FormatError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.methods.awq import apply_clip, fake_quant, search_clip, search_scales
from lowbit.methods.rtn import quantize_rtn
from lowbit.pipeline.blockwise import BlockContext, BlockMethod, collect
from lowbit.pipeline.scaling import can_fold, fold_scales

log = logging.getLogger(__name__)

SKIP_CLIP = ("q_proj", "k_proj")


class SampleObserver:
    """``mean_t |x_tj|`` over all tokens, and every ``stride``-th input row (the search sample)."""

    def __init__(self, in_features: int, stride: int) -> None:
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.stride = stride

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        self.abs_sum += x.abs().to(torch.float32).sum(0).to(device="cpu", dtype=torch.float64)
        first = (-self.count) % self.stride  # keep global rows 0, stride, 2*stride, ...
        self.count += x.shape[0]
        self.rows.append(x[first::self.stride].to("cpu", torch.float32))

    def mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).to(torch.float32)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


@dataclass
class AWQResult:
    """Searched AWQ parameters: ``scales {block.prev: (in,)}``, ``clips {linear: (out, G)}``, alphas."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path, scheme: QuantScheme) -> None:
        tensors = {f"scale::{k}": v.contiguous() for k, v in self.scales.items()}
        tensors.update({f"clip::{k}": v.contiguous() for k, v in self.clips.items()})
        meta = {"format": "lowbit-awq", "scheme": json.dumps(scheme.to_dict()), "alphas": json.dumps(self.alphas)}
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path) -> tuple[AWQResult, QuantScheme]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
            raise FormatError(f"{path}: not a readable AWQ search file ({e}); rerun with --awq-save") from e
        if meta.get("format") != "lowbit-awq":
            raise FormatError(f"{path} is not an AWQ search result written by lowbit (--awq-save)")
        res = cls({k[7:]: v for k, v in tensors.items() if k.startswith("scale::")},
                  {k[6:]: v for k, v in tensors.items() if k.startswith("clip::")}, json.loads(meta["alphas"]))
        return res, QuantScheme.from_dict(json.loads(meta["scheme"]))


@dataclass
class AWQMethod:
    """AWQ search + apply per block, then ``inner`` quantizes the block (None: plain RTN)."""

    scheme: QuantScheme
    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    max_tokens: int = 2048  # input rows the scale search scores (a strided sample of the calibration tokens)
    clip_tokens: int = 512  # of which the clipping search uses this many (AutoAWQ's n_sample_token)
    scale_dtype: torch.dtype = torch.bfloat16
    inner: BlockMethod | None = None
    preset: AWQResult | None = None
    result: AWQResult = field(default_factory=AWQResult)
    needs_calibration: bool = True

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        prefix = f"{ctx.spec.blocks}.{ctx.index}"
        if self.preset is None:
            self._search(ctx, prefix)
        else:
            self._apply(ctx, prefix, self.preset)
        if self.inner is not None:
            return self.inner.quantize_block(ctx)
        return {n: quantize_rtn(lin.weight, self.scheme, scale_dtype=self.scale_dtype)
                for n, lin in ctx.linears.items()}

    def _apply(self, ctx: BlockContext, prefix: str, res: AWQResult) -> None:
        """The search's own order: per group, fold its scales, then clamp its linears."""
        for g in ctx.spec.groups:
            s = res.scales.get(f"{prefix}.{g.prev}")
            if s is not None:
                fold_scales(ctx.block, ctx.spec, g, s)
            for n in g.linears:
                m = res.clips.get(f"{prefix}.{n}")
                if m is not None:
                    apply_clip(ctx.linears[n].weight, m)

    def _search(self, ctx: BlockContext, prefix: str) -> None:
        groups = [g for g in ctx.spec.groups if can_fold(ctx.block, g)]
        firsts = {g.linears[0]: g for g in ctx.spec.groups}
        total = sum(int(x.numel() // x.shape[-1]) for x in ctx.inputs)
        stride = max(1, -(-total // self.max_tokens))
        obs = collect(ctx, lambda n, lin: SampleObserver(lin.in_features, stride), names=list(firsts))
        quant = fake_quant(self.scheme, self.scale_dtype)
        gs = self.scheme.group_size
        for g in ctx.spec.groups:
            o: Any = obs[g.linears[0]]
            x = o.sample().to(ctx.device)
            if g in groups:
                ws = [ctx.linears[n].weight for n in g.linears]
                s, alpha, ratio = search_scales(x, o.mean().to(ctx.device), ws, quant, gs, self.grid,
                                                self.duo_scaling)
                self.result.alphas[f"{prefix}.{g.prev}"] = alpha
                if alpha >= 0:
                    fold_scales(ctx.block, ctx.spec, g, s)
                    self.result.scales[f"{prefix}.{g.prev}"] = s.cpu()
                    x = x / s
                log.debug("%s.%s: alpha %.2f, loss x%.3f of RTN", prefix, g.prev, alpha, ratio)
            if not self.clip:
                continue
            for n in g.linears:
                if n.rsplit(".", 1)[-1] in SKIP_CLIP:
                    continue
                lin = ctx.linears[n]
                xc = x[:: max(1, -(-x.shape[0] // self.clip_tokens))]
                m = search_clip(lin.weight, xc, quant, gs)
                apply_clip(lin.weight, m)
                self.result.clips[f"{prefix}.{n}"] = m.cpu()
