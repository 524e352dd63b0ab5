"""The measured cost of quantizing one tensor alone: KL divergence of the model so changed, against the float one.

    KLD = 1/|S| sum_{t in S} sum_v P_t(v) (log P_t(v) - log Q_t(v))

over the scored positions ``S`` of fixed windows (the second half of each, as llama.cpp's perplexity
scores). The float model's inputs of every decoder block are computed once and kept, so changing a linear
of block ``L`` reruns blocks ``L ..`` only; the embedding (or a tied head) reruns everything. The reference
log-probabilities are kept too (``windows x |S| x vocab`` float32).

This is the ground truth the fast estimate (:mod:`lowbit.mixed.costs`) is checked against; it runs on the
float model in memory with one weight swapped, not on an artifact.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.models.archs import get_arch, get_blocks
from lowbit.pipeline.capture import capture_inputs

log = logging.getLogger(__name__)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the head (``model.model.norm`` in the supported families)."""
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    if not isinstance(norm, nn.Module):
        raise LowbitError(f"{type(model).__name__}: no final norm at model.model.norm; single-tensor KLD "
                          "needs it to finish a forward from a block's cached input")
    return norm


class SingleTensorKLD:
    """KLD of ``model`` with one weight replaced, on ``tokens (n, T)`` (positions ``T//2 .. T-1`` scored); the
    model runs where its parameters are."""

    @torch.inference_mode()
    def __init__(self, model: Any, tokens: torch.Tensor) -> None:
        self.model = model
        self.spec = get_arch(model)
        self.blocks = get_blocks(model, self.spec)
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        self.cap = getattr(model.config, "final_logit_softcapping", None)
        self.device = next(model.parameters()).device
        self.tokens = tokens.to(self.device)
        self.first = tokens.shape[1] // 2
        hidden, self.kwargs = capture_inputs(model, self.tokens, self.spec, self.device)
        if not torch.equal(hidden[0], self._embed(0)):
            raise LowbitError(f"{type(model).__name__}: block 0's input is not the embedding's output; "
                              "single-tensor KLD of the embedding would be wrong for this architecture")
        self.inputs: list[list[torch.Tensor]] = [hidden]
        for i, b in enumerate(self.blocks[:-1]):
            self.inputs.append([self._block(b, i, h) for h in self.inputs[-1]])
        last = [self._block(self.blocks[-1], len(self.blocks) - 1, h) for h in self.inputs[-1]]
        self.ref = [self._logp(h) for h in last]

    def _block(self, b: nn.Module, i: int, h: torch.Tensor) -> torch.Tensor:
        y = b(h, **self.kwargs[i])
        return y[0] if isinstance(y, tuple) else y

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        z = self.head(self.norm(h[:, self.first:]))[0].float()
        if self.cap is not None:
            z = torch.tanh(z / self.cap) * self.cap
        return torch.log_softmax(z, -1)

    @property
    def n_scored(self) -> int:
        return len(self.ref) * self.ref[0].shape[0]

    @torch.inference_mode()
    def _run_from(self, start: int | None) -> float:
        """Mean KLD with the model as it is now, from block ``start``'s cached input (None: from the tokens)."""
        total = 0.0
        for w in range(len(self.ref)):
            if start is None:
                h = self._embed(w)
                start_ = 0
            else:
                h, start_ = self.inputs[start][w], start
            for i in range(start_, len(self.blocks)):
                h = self._block(self.blocks[i], i, h)
            lq = self._logp(h)
            lp = self.ref[w]
            total += float((lp.exp() * (lp - lq)).sum(dtype=torch.float64))
        return total / self.n_scored

    def _embed(self, w: int) -> torch.Tensor:
        return self.model.get_input_embeddings()(self.tokens[w:w + 1])

    def kld(self, module: str, weight: torch.Tensor) -> float:
        """Mean KLD with ``module``'s weight (a linear of a block, the head, or the input embedding) set to
        ``weight``; the float weight is restored afterwards."""
        mod = self.model.get_submodule(module)
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.shape != weight.shape:
            raise LowbitError(f"{module}: no weight of shape {tuple(weight.shape)} to replace")
        start = self._start(module, mod)
        saved = w.data.clone()
        try:
            w.data.copy_(weight.to(w.dtype))
            return self._run_from(start)
        finally:
            w.data.copy_(saved)

    def _start(self, module: str, mod: nn.Module) -> int | None:
        emb = self.model.get_input_embeddings()
        if mod is emb or (self.head is not None and self.head.weight is emb.weight and mod is self.head):
            return None  # the embedding changes every block's input
        if mod is self.head:
            return len(self.blocks)
        prefix = self.spec.blocks + "."
        if not module.startswith(prefix):
            raise LowbitError(f"{module} is neither a block's linear, the head nor the embedding")
        return int(module[len(prefix):].split(".", 1)[0])


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists (average ranks for ties)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two lists of the same length, at least 2")

    def ranks(x: list[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        order = torch.argsort(t, stable=True)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(t):  # ties: their mean rank
            m = t == v
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0
