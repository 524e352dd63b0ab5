"""Streamed perplexity / KL-divergence / top-1 harness: several models against a reference, window by window.

Protocols (numbers are only comparable within one protocol; every result carries its protocol):

``gptq`` (GPTQ/AWQ papers): the text is tokenized once into ids (N,); window w is
``ids[w*ctx:(w+1)*ctx]`` for ``w < N // ctx`` (the last partial window is dropped). Logits at
positions 0..ctx-2 predict tokens 1..ctx-1, i.e. ``ctx - 1`` scored tokens per window. The
canonical loop reports ``exp(sum_w(mean_loss_w * ctx) / (n_windows * ctx))`` = exp(mean over
windows of the per-window mean loss); since every window scores the same ``ctx - 1`` tokens this
equals the token-weighted ``exp(total_nll / total_scored_tokens)`` computed here.

``llamacpp`` (``llama-perplexity``): the same non-overlapping chunks of ``ctx`` tokens (512 there);
when ``bos_token_id`` is given (the tokenizer adds a BOS), the first token of each chunk is
replaced by BOS. With ``first = ctx // 2``, logits at positions ``first .. ctx-2`` predict tokens
``first+1 .. ctx-1``: ``ctx - first - 1`` scored tokens per chunk (255 for ctx=512), and
ppl = exp(total_nll / total_scored_tokens). (llama.cpp also refuses texts shorter than ``2*ctx``
tokens; here one window is enough. It reads the raw file, not the GPTQ "\\n\\n"-joined text.)

Against a reference P (one forward per window, shared by all candidates) each candidate Q gets,
per scored token t: ``KL(P_t || Q_t) = sum_v P_t(v) (log P_t(v) - log Q_t(v))`` and top-1
agreement ``[argmax P_t == argmax Q_t]``. log_softmax is taken in float32, sums kept in float64.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lowbit.core.errors import DataError, LowbitError

log = logging.getLogger(__name__)

Protocol = Literal["gptq", "llamacpp"]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
KL_SAMPLE_CAP = 2_000_000  # per-token KL values kept (float32) for the percentile


@dataclass(frozen=True)
class Window:
    """One window: ``input_ids`` (1, L); logits at ``first .. L-2`` predict ids ``first+1 .. L-1``."""

    index: int
    start: int
    input_ids: torch.Tensor
    first: int

    @property
    def n_scored(self) -> int:
        """Number of scored tokens, ``L - 1 - first``."""
        return int(self.input_ids.shape[1]) - 1 - self.first


@dataclass
class EvalResult:
    """Scores of one model on one protocol; ``kld_*``/``top1`` are None without a reference (or for it)."""

    protocol: str
    ctx: int
    n_windows: int
    n_tokens: int
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    kld_mean: float | None
    top1: float | None
    seconds: float  # wall time of this model's forward passes only
    kld_p99: float | None = None
    reference: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return dataclasses.asdict(self)


def adds_bos(tokenizer: Any) -> int | None:
    """The BOS id if ``tokenizer`` prepends one to a plain encode (pass it as ``bos_token_id``), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def tokenize_corpus(tokenizer: Any, text: str) -> torch.Tensor:
    """The text tokenized once with the tokenizer's default special tokens (BOS for Llama): ids (N,)."""
    if not text.strip():
        raise DataError("evaluation text is empty or blank; give a corpus with text (e.g. wikitext2)")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids.reshape(-1).long()


def make_windows(
    token_ids: torch.Tensor,
    protocol: Protocol,
    ctx: int,
    max_windows: int | None = None,
    *,
    bos_token_id: int | None = None,
) -> list[Window]:
    """Cut token ids (N,) into ``min(N // ctx, max_windows)`` non-overlapping windows of ``ctx`` tokens.

    ``gptq``: ``first = 0`` (ctx-1 scored tokens per window). ``llamacpp``: ``first = ctx // 2``
    (``ctx - ctx//2 - 1`` scored), and the first token of each window replaced by ``bos_token_id``
    when given. Raises DataError when N < ctx.
    """
    if protocol not in ("gptq", "llamacpp"):
        raise LowbitError(f"unknown perplexity protocol {protocol!r}; use 'gptq' or 'llamacpp'")
    if ctx < 2:
        raise LowbitError(f"context length {ctx} is too small to score anything; use ctx >= 2 (e.g. 2048)")
    ids = token_ids.reshape(-1).long()
    n = int(ids.numel()) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise DataError(
            f"evaluation text too short: {ids.numel()} tokens, one window needs ctx={ctx}; "
            "use a longer text or a smaller context length"
        )
    first = 0 if protocol == "gptq" else ctx // 2
    windows = []
    for w in range(n):
        chunk = ids[w * ctx : (w + 1) * ctx].clone()
        if protocol == "llamacpp" and bos_token_id is not None:
            chunk[0] = bos_token_id
        windows.append(Window(index=w, start=w * ctx, input_ids=chunk.unsqueeze(0), first=first))
    return windows


def _device_of(model: LogitsFn | torch.nn.Module) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        return p.device if p is not None else None
    return None


def _forward(model: LogitsFn | torch.nn.Module, ids: torch.Tensor, name: str) -> torch.Tensor:
    """Logits (1, T, V) of one model; nn.Modules get ``model(ids).logits`` (no KV cache for HF models)."""
    dev = _device_of(model)
    x = ids.to(dev) if dev is not None else ids
    if isinstance(model, torch.nn.Module):
        out = model(x, use_cache=False) if hasattr(model, "config") else model(x)
        logits = out.logits if hasattr(out, "logits") else out
    else:
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LowbitError(
            f"model {name!r} returned logits {shape}, expected (1, {ids.shape[1]}, vocab); "
            "a callable must map input ids (1, T) to logits (1, T, V)"
        )
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return logits


class _Acc:
    """Running float64 sums for one model."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.kld = 0.0
        self.agree = 0
        self.seconds = 0.0
        self.kl_samples: list[torch.Tensor] = []


def _kl_rows(ref_logp: torch.Tensor, logp: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """``KL(P_ref || P) (S,)`` per row of log-probabilities ``(S, V)``, a ``chunk`` of rows at a time
    (a full-size temporary is ``S x V`` floats: 2 GB for a 262k vocabulary at 2048 tokens)."""
    out = torch.empty(ref_logp.shape[0], dtype=torch.float32, device=ref_logp.device)
    for i in range(0, ref_logp.shape[0], chunk):
        r, c = ref_logp[i : i + chunk], logp[i : i + chunk]
        out[i : i + chunk] = (r.exp() * (r - c)).sum(-1)
    return out


def evaluate(
    models: Mapping[str, LogitsFn | torch.nn.Module],
    tokens: torch.Tensor,
    protocol: Protocol,
    ctx: int,
    max_windows: int | None = None,
    reference: str | None = None,
    progress: bool = True,
    *,
    bos_token_id: int | None = None,
) -> dict[str, EvalResult]:
    """Score every model on the windows of ``tokens`` (N,), streamed, against ``reference`` if given.

    Per window the reference runs once, then each candidate; only one candidate's logits
    (1, ctx, V) live at a time. Returns ``{name: EvalResult}`` in the order of ``models``.
    """
    if not models:
        raise LowbitError("no model to evaluate; pass at least one {name: model}")
    if reference is not None and reference not in models:
        raise LowbitError(f"reference {reference!r} is not among the models {list(models)}; name one of them")
    windows = make_windows(tokens, protocol, ctx, max_windows, bos_token_id=bos_token_id)
    total_scored = sum(w.n_scored for w in windows)
    stride = max(1, math.ceil(total_scored / KL_SAMPLE_CAP))
    accs = {name: _Acc() for name in models}
    order = ([reference] if reference is not None else []) + [m for m in models if m != reference]
    log.info(
        "evaluating %d model(s) on %d %s windows of %d tokens (%d scored), reference=%s",
        len(models), len(windows), protocol, ctx, total_scored, reference,
    )

    from lowbit.core.progress import progress as ticker

    with torch.inference_mode(), ticker(f"{protocol} perplexity", len(windows), progress) as bar:
        for w in windows:
            ids = w.input_ids
            target = ids[0, w.first + 1 :]
            ref_logp: torch.Tensor | None = None
            for name in order:
                acc = accs[name]
                t0 = time.perf_counter()
                logits = _forward(models[name], ids, name)
                acc.seconds += time.perf_counter() - t0
                logp = torch.log_softmax(logits[0, w.first : -1].float(), dim=-1)  # (S, V)
                del logits
                tgt = target.to(logp.device)
                acc.nll += -float(logp.gather(-1, tgt.unsqueeze(-1)).double().sum())
                acc.tokens += w.n_scored
                if name == reference:
                    ref_logp = logp
                    continue
                if ref_logp is not None:
                    logp = logp.to(ref_logp.device)
                    if logp.shape != ref_logp.shape:
                        raise LowbitError(
                            f"model {name!r} has vocabulary {logp.shape[-1]} but the reference has "
                            f"{ref_logp.shape[-1]}; compare models that share a tokenizer and vocab size"
                        )
                    kl = _kl_rows(ref_logp, logp)  # (S,)
                    acc.kld += float(kl.double().sum())
                    acc.agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
                    acc.kl_samples.append(kl[::stride].float().cpu())
                del logp
            bar.advance()

    results: dict[str, EvalResult] = {}
    for name in models:
        acc = accs[name]
        nll = acc.nll / acc.tokens
        compared = reference is not None and name != reference
        p99 = None
        if compared and acc.kl_samples:
            p99 = float(torch.quantile(torch.cat(acc.kl_samples).double(), 0.99))
        results[name] = EvalResult(
            protocol=protocol,
            ctx=ctx,
            n_windows=len(windows),
            n_tokens=acc.tokens,
            ppl=math.exp(nll),
            nll=nll,
            kld_mean=acc.kld / acc.tokens if compared else None,
            top1=acc.agree / acc.tokens if compared else None,
            seconds=acc.seconds,
            kld_p99=p99,
            reference=reference,
        )
        log.info("%s: %s ppl %.4f over %d tokens", name, protocol, results[name].ppl, acc.tokens)
    return results
