"""AWQ as a block method: search (scales, clips), apply (fold + clamp), then quantize (RTN or GPTQ).

Per block, one run of the block over the calibration inputs (already passed through the quantized
blocks before it) records, for every group of linears of the architecture table, ``mean_t |x_tj|``
over all tokens and a strided sample of at most ``max_tokens`` input rows, and the calls of each
group's *parent* (the smallest module holding all its linears: the attention for q/k/v, the MLP for
gate/up) on evenly spaced calibration inputs of at most ``max_tokens`` tokens. Then, in execution
order, each foldable group gets the scales that minimise its parent's output error
(:func:`lowbit.methods.awq.search_scales`; ``objective="linear"`` scores the linears' own outputs
on the row sample instead, cheaper and weaker), folded into
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
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from lowbit.core.errors import FormatError, SchemeError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.methods.awq import Loss, apply_clip, fake_quant, linear_loss, search_clip, search_scales
from lowbit.methods.rtn import quantize_rtn
from lowbit.pipeline.blockwise import BlockContext, BlockMethod, collect
from lowbit.pipeline.scaling import can_fold, fold_scales

log = logging.getLogger(__name__)

SKIP_CLIP = ("q_proj", "k_proj", "qkv_proj")  # their outputs meet in a softmax (qkv_proj: fused, Phi-3)


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


def parent_name(linears: tuple[str, ...]) -> str:
    """The smallest module of the block holding every one of ``linears`` ("" is the block itself)."""
    parts = [n.split(".") for n in linears]
    if len(parts) == 1:
        return linears[0]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


class ParentCalls:
    """Records what each parent module is called with during one run of the block.

    A parent that mixes tokens (attention) keeps its whole calls (args, kwargs) on evenly spaced
    calibration inputs of at most ``max_tokens`` tokens; a token-wise one (a linear, or a module
    the architecture table lists as ``tokenwise``, the MLP) keeps every ``stride``-th input row of
    every call, ``max_tokens`` rows drawn from all sequences. :meth:`loss` then scores effective
    weights of a group by the parent's output error against its output with the current weights.
    """

    def __init__(self, ctx: BlockContext, parents: set[str], max_tokens: int) -> None:
        self.ctx = ctx
        per = max(1, int(ctx.inputs[0].numel() // ctx.inputs[0].shape[-1])) if ctx.inputs else 1
        n = max(1, min(len(ctx.inputs), max_tokens // per))
        self.pick = {round(i * len(ctx.inputs) / n) for i in range(n)}  # input indices whose calls are kept
        total = sum(int(x.numel() // x.shape[-1]) for x in ctx.inputs)
        self.stride = max(1, -(-total // max_tokens))
        self.tokenwise = {p for p in parents if p in ctx.spec.tokenwise or p in ctx.linears}
        self.calls: dict[str, list[tuple[tuple, dict]]] = {p: [] for p in parents}
        self.rows: dict[str, list[torch.Tensor]] = {p: [] for p in self.tokenwise}
        self.seen: dict[str, int] = dict.fromkeys(parents, 0)
        self.handles: list[Any] = []

    def __enter__(self) -> ParentCalls:
        for p in self.calls:
            def hook(m: torch.nn.Module, args: tuple, kw: dict, p: str = p) -> None:
                if p in self.tokenwise and len(args) == 1 and not kw:
                    x = args[0].reshape(-1, args[0].shape[-1])
                    self.rows[p].append(x[(-self.seen[p]) % self.stride::self.stride])
                    self.seen[p] += x.shape[0]
                    return
                if self.seen[p] in self.pick:
                    self.calls[p].append((args, dict(kw)))
                self.seen[p] += 1
            self.handles.append(self.ctx.block.get_submodule(p).register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        for p, rows in self.rows.items():
            if rows:
                self.calls[p] = [((torch.cat(rows),), {})]

    @staticmethod
    def _first(y: Any) -> torch.Tensor:
        return y[0] if isinstance(y, tuple) else y

    @torch.no_grad()
    def loss(self, parent: str, lins: list[torch.nn.Linear]) -> Loss:
        """``L(W') = sum ||P(x) - P_{W'}(x)||^2`` over the recorded calls of ``parent``."""
        mod = self.ctx.block.get_submodule(parent)
        calls = self.calls[parent]
        ref = [self._first(mod(*a, **k)).to(torch.float32) for a, k in calls]
        orig = [lin.weight.detach().clone() for lin in lins]  # restored after every candidate

        @torch.no_grad()
        def loss(eff: list[torch.Tensor]) -> float:
            try:
                for lin, w in zip(lins, eff, strict=True):
                    lin.weight.copy_(w.to(lin.weight.dtype))
                return sum(float((self._first(mod(*a, **k)).to(torch.float32) - y).square().sum())
                           for (a, k), y in zip(calls, ref, strict=True))
            finally:
                for lin, w in zip(lins, orig, strict=True):
                    lin.weight.copy_(w)
        return loss


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


@dataclass(frozen=True)
class AWQConfig:
    """Options of AWQ (defaults in docs/decisions.md): the scale search, the optional clipping search,
    and ``inner``, the method that quantizes the scaled block: RTN (``RTNConfig``) or GPTQ
    (``GPTQConfig``). ``preset``: a saved search result (``--awq-save``) applied instead of searching."""

    grid: int = 20
    duo_scaling: bool | str = True  # True, False, or "both" (score both grids)
    clip: bool = False
    objective: str = "parent"  # "parent": the output error of the module holding the group; "linear": its own
    max_tokens: int = 16384  # calibration tokens the scale search scores
    propagate: str = "quantized"  # what a block passes on: its quantized outputs, or "float" ones (AutoAWQ)
    clip_tokens: int = 512
    inner: Any = None  # RTNConfig | GPTQConfig; None is RTN
    preset: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 2:
            raise SchemeError(f"AWQ grid must be an integer >= 2, got {self.grid!r}")
        if self.duo_scaling not in (True, False, "both"):
            raise SchemeError(f"AWQ duo_scaling must be true, false or 'both', got {self.duo_scaling!r}")
        if self.objective not in ("parent", "linear"):
            raise SchemeError(f"AWQ objective must be 'parent' or 'linear', got {self.objective!r}")
        if self.propagate not in ("quantized", "float"):
            raise SchemeError(f"AWQ propagate must be 'quantized' or 'float', got {self.propagate!r}")
        for f in ("max_tokens", "clip_tokens"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SchemeError(f"AWQ {f} must be a positive integer, got {v!r}")


@dataclass
class AWQMethod(BlockMethod):
    """AWQ search + apply per block, then ``inner`` quantizes the block (None: plain RTN).

    Each group of linears is searched and quantized with the scheme the engine assigned it
    (``ctx.scheme`` of its first linear); a group's scales fold into its feeding module only where that
    module is a norm or one of this method's own linears (never into a weight another method quantized).
    """

    scheme: QuantScheme
    grid: int = 20
    duo_scaling: bool | str = True  # True, False, or "both" (score both grids)
    clip: bool = False  # AutoAWQ-style clipping search after the scales (docs/decisions.md: off by default)
    objective: str = "parent"  # "parent": error of the module holding the group; "linear": the linears' own
    max_tokens: int = 16384  # tokens the scale search scores (whole calibration inputs; rows for "linear")
    # what a block passes on: its quantized outputs (llm-compressor's sequential pipeline) or "float" ones
    # from the statistics run (AutoAWQ's choice: one block run fewer)
    propagate: str = "quantized"
    clip_tokens: int = 512  # of which the clipping search uses this many (AutoAWQ's n_sample_token)
    scale_dtype: torch.dtype = torch.bfloat16
    inner: BlockMethod | None = None
    preset: AWQResult | None = None
    result: AWQResult = field(default_factory=AWQResult)
    needs_calibration: bool = True
    run_state: ClassVar[tuple[str, ...]] = ("result",)

    def __post_init__(self) -> None:
        if self.objective not in ("parent", "linear"):
            raise SchemeError(f"AWQ objective must be 'parent' or 'linear', got {self.objective!r}")
        if self.propagate not in ("quantized", "float"):
            raise SchemeError(f"AWQ propagate must be 'quantized' or 'float', got {self.propagate!r}")
        if self.propagate == "float" and self.inner is not None:
            raise SchemeError("AWQ with propagate='float' quantizes by RTN only: GPTQ after it needs the "
                              "quantized model's inputs; use propagate='quantized' for awq+gptq")

    @property
    def folds_scales(self) -> str | None:
        return "AWQ"

    @property
    def float_inputs(self) -> bool:
        """The inner method's need (GPTQ with asymmetric calibration): the engine carries the float
        model's block inputs; the scales AWQ folds leave the float block's output unchanged."""
        return self.inner is not None and self.inner.float_inputs

    @property
    def inner_method(self) -> BlockMethod | None:
        return self.inner

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        prefix = f"{ctx.spec.blocks}.{ctx.index}"
        if self.preset is None:
            self._search(ctx, prefix)
        else:
            if self.propagate == "float":  # the float block's outputs, before any fold or clip
                ctx.run(keep_outputs=True)
                ctx.outputs_ready = True
            self._apply(ctx, prefix, self.preset)
        if self.inner is not None:
            return self.inner.quantize_block(ctx)
        return {n: quantize_rtn(lin.weight, ctx.scheme(n, self.scheme), scale_dtype=self.scale_dtype)
                for n, lin in ctx.linears.items()}

    def _apply(self, ctx: BlockContext, prefix: str, res: AWQResult) -> None:
        """The search's own order: per group, fold its scales, then clamp its linears."""
        for g in _own_groups(ctx):
            s = res.scales.get(f"{prefix}.{g.prev}")
            if s is not None:
                fold_scales(ctx.block, ctx.spec, g, s)
            for n in g.linears:
                m = res.clips.get(f"{prefix}.{n}")
                if m is not None:
                    apply_clip(ctx.linears[n].weight, m)

    def _search(self, ctx: BlockContext, prefix: str) -> None:
        own = _own_groups(ctx)
        groups = [g for g in own if can_fold(ctx.block, g)
                  and (g.prev not in ctx.spec.linears or g.prev in ctx.linears)]  # never fold into another's
        firsts = {g.linears[0]: g for g in own}
        total = sum(int(x.numel() // x.shape[-1]) for x in ctx.inputs)
        stride = max(1, -(-total // self.max_tokens))
        parents = {g.inspect or parent_name(g.linears) for g in groups} if self.objective == "parent" else set()
        with ParentCalls(ctx, parents, self.max_tokens) as calls:
            obs = collect(ctx, lambda n, lin: SampleObserver(lin.in_features, stride), names=list(firsts),
                          keep_outputs=self.propagate == "float")
        for g in own:
            scheme = ctx.scheme(g.linears[0], self.scheme)
            quant = fake_quant(scheme, self.scale_dtype)
            gs = scheme.group_size
            o: Any = obs[g.linears[0]]
            x = o.sample().to(ctx.device)
            if g in groups:
                lins = [ctx.linears[n] for n in g.linears]
                ws = [lin.weight for lin in lins]
                loss = (calls.loss(g.inspect or parent_name(g.linears), lins) if self.objective == "parent"
                        else linear_loss(x, ws))
                s, alpha, ratio = search_scales(o.mean().to(ctx.device), ws, quant, gs, loss, self.grid,
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


def _own_groups(ctx: BlockContext) -> list[Any]:
    """The architecture's groups of linears that are this method's in this block (all their linears)."""
    own = [g for g in ctx.spec.groups if g.linears[0] in ctx.linears]
    for g in own:
        if any(n not in ctx.linears for n in g.linears):
            raise SchemeError(f"{ctx.prefix}: {', '.join(g.linears)} share one input and one AWQ scale; give them "
                              "one scheme and method")
    return own
