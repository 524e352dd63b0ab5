"""Sensitivity: for every tensor a budget is spent on and every candidate, the predicted cost of storing it so
(and, on request, the measured one), written as a readable JSON file the allocation reads.

    lowbit sensitivity MODEL --family gguf -o sens.json            # GGUF types, llama.cpp's encoders
    lowbit sensitivity MODEL --family int --method gptq -o s.json  # integer schemes by GPTQ

The estimate (:mod:`lowbit.mixed.costs`): the candidate's own weight error ``dW`` on the tensor alone, weighted
by the diagonal Fisher information of the float model (:mod:`lowbit.mixed.fisher`), i.e. the predicted mean KL
divergence of the model with that tensor alone quantized. GPTQ's errors are correlated across input columns
by design (that is how it lowers the layer's output error), which a diagonal weighting cannot see: its cost is
the diagonal estimate scaled by ``dW^T H dW / dW^T diag(H) dW`` (``H = X^T X`` of the layer's float inputs),
the share of the diagonal output error that GPTQ's correlations leave.

The measurement (:mod:`lowbit.mixed.measure`): the mean KL divergence of the model with only that tensor
quantized, on fixed windows of an evaluation text; :func:`rank_agreement` reports how well the estimate
ranks against it (Spearman).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.io import write_json_atomic
from lowbit.mixed.candidates import Candidate, parse_candidate
from lowbit.mixed.measure import spearman
from lowbit.mixed.tensors import TensorEntry

log = logging.getLogger(__name__)
VERSION = 1
GGUF_ALIGNMENT = 32  # gguf-py's default: every tensor's data starts on a multiple of it


def pad(n: int, to: int = GGUF_ALIGNMENT) -> int:
    return -(-n // to) * to


@dataclass
class Sensitivity:
    """Per tensor and candidate: predicted cost (``cost``, mean KLD), bytes, and measured KLD where measured.

    ``fixed_bytes`` / ``fixed_values``: what the artifact holds beside the allocated tensors (norms,
    unquantized embeddings), as stored; ``scale_bytes``: bytes of one integer-scheme scale (the storage dtype's).
    """

    model: str
    family: str
    candidates: list[str]
    tensors: list[TensorEntry]
    cost: dict[str, dict[str, float]]
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    method: str | None = None
    fixed_bytes: int = 0
    fixed_values: int = 0
    scale_bytes: int = 2
    meta: dict[str, Any] = field(default_factory=dict)

    def candidate(self, name: str) -> Candidate:
        return parse_candidate(name, self.family)

    def nbytes(self, tensor: TensorEntry, cand: str) -> int:
        """Bytes the file gives ``tensor`` stored as ``cand``: GGUF pads each tensor's data to 32 bytes."""
        n = self.candidate(cand).nbytes(tensor.shape, self.scale_bytes)
        return pad(n) if self.family == "gguf" else n

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION, "model": self.model, "family": self.family, "method": self.method,
            "candidates": self.candidates, "scale_bytes": self.scale_bytes,
            "fixed": {"bytes": self.fixed_bytes, "values": self.fixed_values}, "meta": self.meta,
            "rank_agreement": rank_agreement(self) if self.measured else None,
            "tensors": [{"name": t.name, "module": t.module, "shape": list(t.shape), "unit": t.unit,
                         "cost": self.cost[t.name],
                         "bytes": {c: self.nbytes(t, c) for c in self.cost[t.name]},
                         **({"measured": self.measured[t.name]} if t.name in self.measured else {})}
                        for t in self.tensors],
        }

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LowbitError(f"cannot read the sensitivity file {p}: {e}") from e
        if not isinstance(d, dict) or d.get("version", 0) > VERSION or "tensors" not in d:
            raise LowbitError(f"{p} is not a lowbit sensitivity file (version {VERSION}); make one with "
                              "`lowbit sensitivity MODEL -o FILE`")
        tensors = [TensorEntry(t["name"], t["module"], (int(t["shape"][0]), int(t["shape"][1])), t["unit"])
                   for t in d["tensors"]]
        return cls(d["model"], d["family"], list(d["candidates"]), tensors,
                   {t["name"]: {k: float(v) for k, v in t["cost"].items()} for t in d["tensors"]},
                   {t["name"]: t["measured"] for t in d["tensors"] if "measured" in t}, d.get("method"),
                   int(d["fixed"]["bytes"]), int(d["fixed"]["values"]), int(d.get("scale_bytes", 2)),
                   d.get("meta", {}))


def rank_agreement(s: Sensitivity) -> dict[str, Any]:
    """Spearman of estimate against measurement: over every measured (tensor, candidate) pair, and per candidate
    across tensors (the ranking the allocation relies on most)."""
    pairs = [(s.cost[t][c], m) for t, ms in s.measured.items() for c, m in ms.items() if c in s.cost.get(t, {})]
    out: dict[str, Any] = {"pairs": len(pairs)}
    if len(pairs) >= 2:
        out["all"] = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    per = {}
    for c in s.candidates:
        xs = [(s.cost[t][c], ms[c]) for t, ms in s.measured.items() if c in ms and c in s.cost.get(t, {})]
        if len(xs) >= 3:
            per[c] = {"tensors": len(xs), "spearman": spearman([x[0] for x in xs], [x[1] for x in xs])}
    out["per_candidate"] = per
    return out


def timed(meta: dict[str, Any], key: str, t0: float) -> None:
    meta.setdefault("seconds", {})[key] = round(time.perf_counter() - t0, 1)


def with_bos(tokens: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """``tokens`` with position 0 set to BOS where the tokenizer starts every text with one (Gemma, Llama):
    what the engines see (llama.cpp's perplexity does the same); models like Gemma are far from their usual
    regime without it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    if bos is None or not ids or ids[0] != bos:
        return tokens
    out = tokens.clone()
    out[:, 0] = bos
    return out
