"""Log-likelihood of token requests: ``(sum_k log p(target_k | prefix), greedy)`` per request.

For a request with inputs ``x (L,)`` and targets ``c (m,)``, the logits ``z_t (V,)`` at positions
``t = L-m .. L-1`` predict ``c``: ``ll = sum_t log_softmax(z_t)[c_t]`` (float32, as lm-eval's
float32 models compute it) and ``greedy = all_t argmax(log_softmax(z_t)) == c_t``. Only these
``m`` rows of logits are formed, ``ROW_CHUNK`` rows of log-softmax at a time (``262k x 4 B = 1 MB``
per row for the largest vocabularies).

Three ways to get the logits, chosen by :func:`make_scorer`:

- :class:`PackedScorer` (Hugging Face causal LMs: every lowbit artifact loaded by transformers):
  a whole pack of documents in one forward over its token trie (:mod:`.packing`), with the
  ancestor mask as a 4D attention mask, the trie depths as ``position_ids`` and ``logits_to_keep``
  = the scored nodes. Checked against :class:`PlainScorer` on the first pack; a model that
  disagrees (an attention kernel that ignores custom masks) falls back to plain scoring.
- :class:`LlamaCppScorer` (GGUF through llama.cpp): requests in sorted order, each one keeping
  llama.cpp's KV cache of the prefix it shares with the previous one.
- :class:`PlainScorer` (any ``ids (1, T) -> logits (1, T, V)`` callable): one forward per request,
  exactly lm-eval's ``HFLM`` computation at batch size 1.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lowbit.core.errors import LowbitError
from lowbit.eval.llamacpp import LlamaCppLogits
from lowbit.eval.tasks.encode import TokenRequest
from lowbit.eval.tasks.packing import Pack, attention_bias, build_pack

log = logging.getLogger(__name__)

ROW_CHUNK = 64  # rows of log-softmax formed at a time
CHECK_ATOL = 1e-2  # packed vs plain log-likelihood: float32 reassociation gives ~1e-4, a wrong mask >= 0.1
Score = tuple[float, bool]


def score_rows(logits: torch.Tensor, rows: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> list[Score]:
    """``(ll, greedy)`` per request from logits ``(K, V)``: request r reads rows ``rows[r] (m_r,)`` for
    ``targets[r] (m_r,)``; log-softmax ``ROW_CHUNK`` rows at a time, the picked values summed in float32."""
    k = logits.shape[0]
    all_rows, all_targets = torch.cat(list(rows)), torch.cat(list(targets))
    picked = torch.empty(all_rows.numel(), dtype=torch.float32)
    best = torch.empty(k, dtype=torch.long)
    for start in range(0, k, ROW_CHUNK):
        lp = torch.log_softmax(logits[start : start + ROW_CHUNK].float(), dim=-1)  # (c, V)
        best[start : start + lp.shape[0]] = lp.argmax(-1)
        sel = (all_rows >= start) & (all_rows < start + lp.shape[0])
        picked[sel] = lp[all_rows[sel] - start, all_targets[sel]]
    out = []
    for seg, r, t in zip(picked.split([len(r) for r in rows]), rows, targets, strict=True):
        out.append((float(seg.sum()), bool((best[r] == t).all())))
    return out


def _forward_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(1, T, V)`` of ``ids (1, T)`` as lm-eval calls a model (``model(ids).logits``) or a callable."""
    if isinstance(model, torch.nn.Module):
        out = model(ids, use_cache=False) if hasattr(model, "config") else model(ids)
        logits = out.logits if hasattr(out, "logits") else out
    else:
        logits = model(ids)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LowbitError(f"the model returned logits {shape}, expected (1, {ids.shape[1]}, vocab); a callable "
                          "must map input ids (1, T) to logits (1, T, V)")
    return logits


def _device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


def _is_hf(model: Any) -> bool:
    """A Hugging Face causal LM (an ``nn.Module`` with a config), as every artifact transformers loads."""
    return isinstance(model, torch.nn.Module) and hasattr(model, "config")


def _takes_logits_to_keep(model: Any) -> bool:
    return _is_hf(model) and "logits_to_keep" in inspect.signature(model.forward).parameters


class PlainScorer:
    """One forward per request (lm-eval's ``HFLM`` at batch size 1); an HF model forms logits only at the
    target positions (``logits_to_keep``: the same rows, without the rest of the ``lm_head`` product)."""

    name = "plain"

    def __init__(self, model: Callable[..., Any]) -> None:
        self.model = model
        self.device = _device(model)
        self.keep_arg = _takes_logits_to_keep(model)
        self.tokens = 0

    def score(self, requests: Sequence[TokenRequest]) -> list[Score]:
        out = []
        for req in requests:
            ids = torch.tensor([req.input_ids], dtype=torch.long, device=self.device)
            if self.keep_arg:
                logits = self.model(ids, use_cache=False, logits_to_keep=len(req.targets)).logits[0]
            else:
                logits = _forward_logits(self.model, ids)[0, -len(req.targets):]
            self.tokens += len(req.input_ids)
            rows = torch.arange(len(req.targets))
            out += score_rows(logits.cpu(), [rows], [torch.tensor(req.targets)])
        return out


class PackedScorer:
    """A pack of requests in one forward over their token trie (see the module docstring)."""

    name = "packed"
    verdicts: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()  # model -> check passed

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = _device(model)
        get_emb = getattr(model, "get_input_embeddings", None)
        weight = getattr(get_emb() if callable(get_emb) else None, "weight", None)
        # the mask is added to attention scores, which have the activations' dtype (the embeddings')
        self.dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
        cfg = model.config
        window = getattr(getattr(cfg, "text_config", None) or cfg, "sliding_window", None)
        self.window = window if isinstance(window, int) and window > 0 else None
        self.keep_arg = _takes_logits_to_keep(model)
        self.plain = PlainScorer(model)
        self.packed_tokens = 0

    @property
    def tokens(self) -> int:
        """Tokens run through the model: trie nodes of the packs plus requests scored plainly."""
        return self.packed_tokens + self.plain.tokens

    def _run(self, pack: Pack) -> list[Score]:
        dev = self.device
        kw: dict[str, Any] = {"attention_mask": attention_bias(pack.parents, self.dtype).to(dev),
                              "position_ids": pack.positions[None].to(dev), "use_cache": False}
        if self.keep_arg:
            kw["logits_to_keep"] = pack.keep.to(dev)
        logits = self.model(pack.ids[None].to(dev), **kw).logits[0]
        if not self.keep_arg:
            logits = logits[pack.keep.to(dev)]
        self.packed_tokens += pack.n_nodes
        return score_rows(logits.cpu(), pack.rows, pack.targets)

    def score(self, requests: Sequence[TokenRequest]) -> list[Score]:
        if self.window is not None and any(len(r.input_ids) > self.window for r in requests):
            return self.plain.score(requests)  # the 4D mask would drop the model's sliding window
        verdict = self.verdicts.get(self.model)
        if verdict is False:
            return self.plain.score(requests)
        res = self._run(build_pack(requests))
        if verdict is None:  # first pack of this model: check against one forward per request
            first = list(requests[: min(len(requests), 4)])
            worst = max(abs(a[0] - b[0]) for a, b in zip(res, self.plain.score(first), strict=False))
            self.verdicts[self.model] = worst <= CHECK_ATOL
            if worst > CHECK_ATOL:
                log.warning("packed prefix-shared scoring differs from plain scoring by %.3g nats on the first "
                            "requests (attention implementation %r ignores custom masks?); scoring one request "
                            "per forward instead", worst, getattr(self.model.config, "_attn_implementation", None))
                return self.plain.score(requests)
        return res


class LlamaCppScorer:
    """GGUF through llama.cpp: requests in sorted order, reusing the KV cache of the shared prefix."""

    name = "llama.cpp"

    def __init__(self, model: LlamaCppLogits) -> None:
        self.model = model
        self.tokens = 0

    def score(self, requests: Sequence[TokenRequest]) -> list[Score]:
        out: list[Score | None] = [None] * len(requests)
        for i in sorted(range(len(requests)), key=lambda j: requests[j].input_ids):
            req = requests[i]
            logits, evaluated = self.model.tail_logits(req.input_ids, len(req.targets))
            self.tokens += evaluated
            rows = torch.arange(len(req.targets))
            out[i] = score_rows(logits, [rows], [torch.tensor(req.targets)])[0]
        return [s for s in out if s is not None]


Scorer = PlainScorer | PackedScorer | LlamaCppScorer


def make_scorer(model: Any, packed: bool = True) -> Scorer:
    """The fastest exact scorer for ``model`` (packed for Hugging Face causal LMs unless ``packed`` is off)."""
    if isinstance(model, LlamaCppLogits):
        return LlamaCppScorer(model)
    if packed and _is_hf(model) and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager"):
        return PackedScorer(model)
    return PlainScorer(model)
