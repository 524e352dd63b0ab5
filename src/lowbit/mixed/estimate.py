"""Computing a :class:`~lowbit.mixed.sensitivity.Sensitivity`: Fisher pass, each candidate's error, the costs,
and on request the single-tensor KLD measurements.

Time on a 0.5B model on a CPU: the Fisher pass is one forward and one backward per calibration sequence
(about three forwards' work); each candidate then quantizes every tensor once (GGUF encoders, RTN) and
weighs its error, elementwise. GPTQ adds one block-by-block pass for the full ``X^T X`` and a GPTQ solve per
linear and candidate. Measurement reruns the model from the changed tensor's block, per tensor and
candidate, and costs far more than the estimate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.progress import progress as ticker
from lowbit.core.qweight import QuantizedWeight
from lowbit.formats.gguf.imatrix import Imatrix
from lowbit.methods.gptq import GPTQConfig, gptq_quantize
from lowbit.mixed.candidates import Candidate, parse_candidates
from lowbit.mixed.costs import INT_METHODS, delta, fisher_error, output_error
from lowbit.mixed.fisher import FisherStats, collect_fisher
from lowbit.mixed.hessians import hessian_pass
from lowbit.mixed.measure import SingleTensorKLD
from lowbit.mixed.sensitivity import Sensitivity, timed, with_bos
from lowbit.mixed.tensors import TensorEntry, gguf_entries, int_entries

log = logging.getLogger(__name__)
Sink = Callable[[str, str, QuantizedWeight], None]


@dataclass(frozen=True)
class SensitivityConfig:
    """What to compute: ``family`` (``int`` / ``gguf``), candidates (None: the family's defaults), the integer
    ``method`` (``rtn``, ``imatrix``, ``gptq``), Fisher calibration (``samples`` x ``length`` tokens of
    ``calib``, ``seed``; GPTQ's ``X^T X`` from ``gptq_samples`` sequences, the first ``samples`` of them the
    same), the scales' storage bytes."""

    family: str = "gguf"
    candidates: tuple[str, ...] | None = None
    method: str = "rtn"
    calib: str | None = None
    samples: int = 8
    length: int = 512
    seed: int = 0
    scale_bytes: int = 2
    gptq: GPTQConfig = GPTQConfig()
    gptq_samples: int | None = None

    def __post_init__(self) -> None:
        if self.family not in ("int", "gguf"):
            raise LowbitError(f"family must be int or gguf, got {self.family!r}")
        if self.family == "int" and self.method not in INT_METHODS:
            raise LowbitError(f"method must be one of {', '.join(INT_METHODS)} for integer schemes, got "
                              f"{self.method!r}")
        if self.samples < 1 or self.length < 2:
            raise LowbitError("the Fisher pass needs at least 1 sequence of at least 2 tokens")
        if self.gptq_samples is not None and self.gptq_samples < self.samples:
            raise LowbitError(f"gptq_samples ({self.gptq_samples}) must be at least samples ({self.samples})")


def _tokens(lm: Any, corpus: str | None, samples: int, length: int, seed: int) -> tuple[torch.Tensor, str]:
    from lowbit.data import calibration_texts, calibration_tokens

    name, texts, _ = calibration_texts(corpus)
    return with_bos(calibration_tokens(lm.tokenizer, texts, samples, length, seed=seed), lm.tokenizer), name


def _entries(lm: Any, cfg: SensitivityConfig) -> tuple[list[TensorEntry], int, int]:
    if cfg.family == "gguf":
        entries, fixed, values, _ = gguf_entries(lm.path)
        return entries, fixed, values
    return int_entries(lm.model, cfg.scale_bytes)


def estimate(lm: Any, cfg: SensitivityConfig, *, imatrix: Imatrix | None = None, progress: bool = True,
             device: str = "cpu", sink: Sink | None = None) -> tuple[Sensitivity, FisherStats, torch.Tensor]:
    """The estimated costs of every (tensor, candidate) of the loaded model ``lm`` (float32, held on the CPU;
    the Fisher pass and GPTQ run on ``device``). ``sink(tensor, candidate, QuantizedWeight)`` receives each
    GPTQ result (a caller may keep them: they are what the artifact of that choice would hold, from float
    inputs)."""
    t0 = time.perf_counter()
    cands = parse_candidates(list(cfg.candidates) if cfg.candidates else None, cfg.family)
    entries, fixed, values = _entries(lm, cfg)
    n_all = cfg.gptq_samples if cfg.family == "int" and cfg.method == "gptq" and cfg.gptq_samples else cfg.samples
    all_tokens, corpus = _tokens(lm, cfg.calib, n_all, cfg.length, cfg.seed)
    tokens = all_tokens[: cfg.samples]
    meta: dict[str, Any] = {"estimator": "fisher-diagonal" + ("+gptq-correlation" if cfg.method == "gptq" else ""),
                            "calibration": {"corpus": corpus, "samples": cfg.samples, "length": cfg.length,
                                            "seed": cfg.seed},
                            "imatrix": None if imatrix is None else imatrix.datasets}
    st = collect_fisher(lm.model.to(device), tokens, seed=cfg.seed, progress=progress)
    lm.model.to("cpu")
    meta["calibration"]["scored_tokens"] = st.tokens
    timed(meta, "fisher", t0)
    t1 = time.perf_counter()
    cost: dict[str, dict[str, float]] = {e.name: {} for e in entries}
    if cfg.family == "int" and cfg.method == "gptq":
        _gptq_costs(lm.model, all_tokens, entries, cands, st, cost, cfg, progress, device, sink)
        meta["calibration"]["gptq_samples"] = n_all
    else:
        with ticker(f"costs of {len(entries)} tensors x {len(cands)} candidates", len(entries), progress) as bar:
            for e in entries:
                cost[e.name] = _tensor_costs(lm.model, e, cands, st, cfg, imatrix)
                bar.advance()
    timed(meta, "costs", t1)
    timed(meta, "total", t0)
    sens = Sensitivity(lm.name, cfg.family, [c.name for c in cands], entries, cost,
                       method=cfg.method if cfg.family == "int" else None, fixed_bytes=fixed, fixed_values=values,
                       scale_bytes=cfg.scale_bytes, meta=meta)
    return sens, st, all_tokens


def _tensor_costs(model: nn.Module, e: TensorEntry, cands: list[Candidate], st: FisherStats,
                  cfg: SensitivityConfig, imatrix: Imatrix | None) -> dict[str, float]:
    W = _weight(model, e.module)
    F = st.fisher[e.module]
    im: np.ndarray | None = imatrix.weights(e.name) if imatrix is not None and cfg.family == "gguf" else None
    out = {}
    for c in cands:
        if c.fits(e.shape):
            dW = delta(W, c, cfg.method, act2=st.act2.get(e.module), imatrix=im,
                       scale_dtype=_scale_dtype(cfg.scale_bytes))
            out[c.name] = fisher_error(dW, F)
    return out


def _at(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _weight(model: nn.Module, module: str) -> torch.Tensor:
    w = model.get_submodule(module).weight
    assert isinstance(w, torch.Tensor)
    return w.detach()


def _scale_dtype(scale_bytes: int) -> torch.dtype:
    return torch.float32 if scale_bytes == 4 else torch.bfloat16


def _gptq_costs(model: nn.Module, tokens: torch.Tensor, entries: list[TensorEntry], cands: list[Candidate],
                st: FisherStats, cost: dict[str, dict[str, float]], cfg: SensitivityConfig, progress: bool,
                device: str, sink: Sink | None) -> None:
    """GPTQ on each linear alone (float inputs) per candidate; the diagonal Fisher cost times the share of the
    diagonal output error that GPTQ's correlated errors leave (see :mod:`lowbit.mixed.sensitivity`)."""
    by_name = {e.name: e for e in entries}

    def on_block(ctx: Any, hbar: dict[str, torch.Tensor]) -> None:
        for local, H in hbar.items():
            e = by_name[f"{ctx.prefix}.{local}"]
            W = ctx.linears[local].weight.detach().float()
            for c in cands:
                if not c.fits(e.shape):
                    continue
                assert c.scheme is not None
                qw, _ = gptq_quantize(W, H, c.scheme, cfg.gptq, scale_dtype=_scale_dtype(cfg.scale_bytes))
                if sink is not None:
                    sink(e.name, c.name, qw)
                dW = qw.dequantize() - W
                diag = output_error(dW, H.diagonal())
                share = output_error(dW, H) / diag if diag > 0 else 1.0
                cost[e.name][c.name] = fisher_error(dW, st.fisher[e.module].to(dW.device)) * share

    hessian_pass(model, tokens, on_block, progress=progress, device=device)


def measure(lm: Any, sens: Sensitivity, windows: torch.Tensor, *, candidates: list[str] | None = None,
            tensors: list[str] | None = None, imatrix: Imatrix | None = None, fisher: FisherStats | None = None,
            calib_tokens: torch.Tensor | None = None, progress: bool = True, device: str = "cpu") -> None:
    """Measured single-tensor KLD of ``sens``'s tensors (or ``tensors``) at ``candidates`` (default all), on
    ``windows (n, T)``; written into ``sens.measured``. GPTQ needs the calibration tokens (its ``X^T X``).
    The model (held on the CPU) runs on ``device`` and goes back to the CPU afterwards."""
    t0 = time.perf_counter()
    names = [c for c in (candidates or sens.candidates) if c in sens.candidates]
    entries = [e for e in sens.tensors if tensors is None or e.name in tensors]
    hbar: dict[str, torch.Tensor] = {}
    if sens.method == "gptq":
        if calib_tokens is None:
            raise LowbitError("measuring GPTQ candidates needs the calibration tokens")
        want = {e.module for e in entries}

        def keep(ctx: Any, h: dict[str, torch.Tensor]) -> None:
            hbar.update({f"{ctx.prefix}.{k}": v.clone() for k, v in h.items() if f"{ctx.prefix}.{k}" in want})

        hessian_pass(lm.model, calib_tokens, keep, progress=progress, device=device)
    meas = SingleTensorKLD(lm.model.to(device), with_bos(windows, lm.tokenizer))
    try:
        _measure_all(lm, sens, meas, entries, names, imatrix, fisher, hbar, progress)
    finally:
        lm.model.to("cpu")
    sens.meta["measurement"] = {"windows": int(windows.shape[0]), "length": int(windows.shape[1]),
                                "scored_tokens": meas.n_scored}
    timed(sens.meta, "measurement", t0)


def _measure_all(lm: Any, sens: Sensitivity, meas: SingleTensorKLD, entries: list[TensorEntry], names: list[str],
                 imatrix: Imatrix | None, fisher: FisherStats | None, hbar: dict[str, torch.Tensor],
                 progress: bool) -> None:
    with ticker(f"single-tensor KLD of {len(entries)} tensors", len(entries), progress) as bar:
        for e in entries:
            W = _weight(lm.model, e.module)
            im = imatrix.weights(e.name) if imatrix is not None and sens.family == "gguf" else None
            for name in names:
                c = sens.candidate(name)
                if name not in sens.cost[e.name]:
                    continue
                act2 = fisher.act2.get(e.module) if fisher is not None else None
                dW = delta(W, c, sens.method or "rtn", act2=act2, H=_at(hbar.get(e.module), W.device), imatrix=im,
                           scale_dtype=_scale_dtype(sens.scale_bytes))
                sens.measured.setdefault(e.name, {})[name] = meas.kld(e.module, W.float() + dW.to(W.device))
            bar.advance()
