"""GGUF files scored by llama.cpp (llama-cpp-python), in the same harness as every other artifact.

:class:`LlamaCppLogits` is a plain callable ``ids (1, T) LongTensor -> logits (1, T, V) float32``
for :func:`lowbit.eval.perplexity.evaluate`: per window it clears the KV cache, evaluates the ids
(``logits_all``: one row of logits per position) and returns llama.cpp's ``scores``. The windows are
the harness's, tokenized by the Hugging Face tokenizer of the reference (or the one transformers
builds from the GGUF), so llama.cpp and transformers score exactly the same tokens.

:func:`speed` measures what ``llama-bench`` calls pp (prefill) and tg (decode): ``n_prompt`` tokens
evaluated as one batch from an empty cache (median of ``reps``), then ``n_gen`` single-token steps.
Times are wall-clock around ``Llama.eval`` after a warm-up; the token ids are fixed pseudo-random
ids (the cost of a step does not depend on which token it is, as in llama-bench).
"""

from __future__ import annotations

import importlib.util
import logging
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.core.errors import LowbitError, ModelLoadError
from lowbit.models.loader import check_gguf

log = logging.getLogger(__name__)

INSTALL = "pip install 'lowbit[llamacpp]'"
_TOKENIZER_PROBE = "The quick brown fox, 12 times: über naïve café!\n\nSecond paragraph."


def llama_cpp_available() -> bool:
    """True when ``llama_cpp`` (llama-cpp-python) can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise LowbitError(f"the llama.cpp backend needs llama-cpp-python ({exc}); install it: {INSTALL}") from exc
    return llama_cpp


def default_threads() -> int:
    """Threads for llama.cpp in evaluation: torch's intra-op count, so both backends get the same cores."""
    return max(1, torch.get_num_threads())


def open_llama(path: str | Path, n_ctx: int, *, logits_all: bool, threads: int | None = None,
               check: bool = True, flash_attn: bool = False) -> Any:
    """``llama_cpp.Llama`` for a GGUF file (CPU, quiet), checked first unless ``check`` is off (done already);
    a load failure is a ModelLoadError. ``flash_attn``: llama.cpp's fused attention (what ``llama-bench`` and
    ``llama-cli`` use by default where it is supported: 1.27x the prefill of the unfused path on SmolLM2,
    2 cores); off for evaluation, whose logits then match llama.cpp's reference tools of the same settings."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such GGUF file: {path}. Fix: pass the path of a .gguf file.")
    if check:
        check_gguf(path)
    llama_cpp = _llama_cpp()
    n = threads or default_threads()
    try:
        extra = {"flash_attn": True} if flash_attn else {}
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
                               n_threads=n, n_threads_batch=n, n_gpu_layers=0, verbose=False, **extra)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"llama.cpp could not load {path} ({exc}). Fix: check that this llama-cpp-python build supports "
            f"the file's architecture and quant types (upgrade it), or evaluate with --backend transformers."
        ) from exc


@dataclass(frozen=True)
class Speed:
    """Tokens per second: ``prefill`` (n_prompt tokens in one batch), ``decode`` (n_gen single steps)."""

    prefill_tps: float
    decode_tps: float
    n_prompt: int
    n_gen: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return asdict(self)


def speed(llm: Any, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, seed: int = 0) -> Speed:
    """Prefill and decode tokens/s of a loaded ``llama_cpp.Llama`` (its cache is cleared before and after).

    ``n_prompt`` is shrunk to fit the context (``n_ctx - n_gen``); the prefill time is the median of
    ``reps`` runs, the decode rate is ``n_gen`` over the time of the steps that follow the last prefill.
    """
    n_ctx, n_vocab = int(llm.n_ctx()), int(llm.n_vocab())
    if n_gen < 1 or n_prompt < 1 or n_ctx < n_gen + 2:
        raise LowbitError(f"speed needs n_prompt >= 1, n_gen >= 1 and n_ctx > n_gen + 1 (n_ctx={n_ctx}, "
                          f"n_gen={n_gen}); load the model with a larger context")
    n_prompt = min(n_prompt, n_ctx - n_gen)
    rng = random.Random(seed)
    prompt = [rng.randrange(n_vocab) for _ in range(n_prompt)]
    steps = [rng.randrange(n_vocab) for _ in range(n_gen)]
    llm.reset()
    llm.eval(prompt[: min(32, n_prompt)])  # warm-up: threads, buffers
    llm.eval(steps[:2])
    prefill = []
    for _ in range(max(1, reps)):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for tok in steps:
        llm.eval([tok])
    decode = time.perf_counter() - t0
    llm.reset()
    threads = int(getattr(getattr(llm, "context_params", None), "n_threads", 0) or 0)
    return Speed(prefill_tps=n_prompt / statistics.median(prefill), decode_tps=n_gen / decode, n_prompt=n_prompt,
                 n_gen=n_gen, threads=threads)


class LlamaCppLogits:
    """A GGUF file run by llama.cpp as a logits callable: ``ids (1, T) -> logits (1, T, V)`` float32.

    ``ctx`` is llama.cpp's context (the longest window it will see). ``threads`` defaults to
    :func:`default_threads`.
    """

    backend = "llama.cpp"

    def __init__(self, path: str | Path, ctx: int, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise LowbitError(f"--threads {threads} must be at least 1")
        self.path = Path(path)
        self.ctx = int(ctx)
        self.threads = threads or default_threads()
        self.llm = open_llama(self.path, self.ctx, logits_all=True, threads=self.threads)

    @property
    def n_vocab(self) -> int:
        """Rows of llama.cpp's output (the GGUF's vocabulary)."""
        return int(self.llm.n_vocab())

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise LowbitError(f"llama.cpp scores one sequence at a time: got ids {tuple(ids.shape)}, expected (1, T)")
        n = int(ids.shape[1])
        if n > self.ctx:
            raise LowbitError(f"window of {n} tokens exceeds the llama.cpp context {self.ctx}; load it with ctx >= {n}")
        tokens = ids[0].tolist()
        if tokens and (min(tokens) < 0 or max(tokens) >= self.n_vocab):
            raise LowbitError(f"token id {max(tokens)} is outside {self.path.name}'s vocabulary of {self.n_vocab}; "
                              "evaluate with a tokenizer that matches the GGUF (e.g. its reference model's)")
        self.llm.reset()
        self.llm.eval(tokens)
        logits = torch.from_numpy(self.llm.scores[:n].copy())  # (T, V) float32
        return logits.unsqueeze(0)

    def tail_logits(self, ids: Sequence[int], n: int) -> tuple[torch.Tensor, int]:
        """(logits ``(n, V)`` float32 at the last ``n`` positions of ``ids``, tokens evaluated).

        Unlike ``__call__`` the KV cache is kept: the longest prefix ``ids`` shares with the tokens in
        the cache (llama.cpp's ``n_past``) is not evaluated again, and its rows of ``scores`` (from
        ``logits_all``) are reused. Callers that sort their sequences evaluate a shared context once.
        """
        ids = [int(t) for t in ids]
        if len(ids) > self.ctx:
            raise LowbitError(f"sequence of {len(ids)} tokens exceeds the llama.cpp context {self.ctx}; "
                              f"load it with ctx >= {len(ids)}")
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            raise LowbitError(f"token id {max(ids)} is outside {self.path.name}'s vocabulary of {self.n_vocab}; "
                              "evaluate with a tokenizer that matches the GGUF (e.g. its reference model's)")
        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        keep = 0
        for a, b in zip(cached, ids, strict=False):
            if a != b:
                break
            keep += 1
        self.llm.n_tokens = keep  # the next eval drops the cache beyond keep and appends from there
        self.llm.eval(ids[keep:])
        rows = self.llm.scores[len(ids) - n : len(ids)]
        return torch.from_numpy(rows.copy()), len(ids) - keep

    def speed(self, n_prompt: int = 512, n_gen: int = 128, reps: int = 3) -> Speed:
        """Tokens/s of this GGUF on a fresh llama.cpp context without ``logits_all`` (as served)."""
        log.info("%s: llama.cpp tokens/s, %d-token prefill (median of %d) and %d decode steps, %d threads",
                 self.path.name, n_prompt, reps, n_gen, self.threads)
        llm = open_llama(self.path, n_prompt + n_gen, logits_all=False, threads=self.threads, check=False,
                         flash_attn=True)
        try:
            res = speed(llm, n_prompt, n_gen, reps)
        finally:
            llm.close()
        return Speed(res.prefill_tps, res.decode_tps, res.n_prompt, res.n_gen, self.threads)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer larger than the GGUF's vocabulary; warn when it splits a probe text differently."""
        size = len(tokenizer)
        if size > self.n_vocab:
            raise LowbitError(f"tokenizer has {size} tokens but {self.path.name} has a vocabulary of {self.n_vocab}; "
                              "evaluate with the tokenizer of the model the GGUF was made from (--reference)")
        ours = list(tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
        theirs = list(self.llm.tokenize(_TOKENIZER_PROBE.encode(), add_bos=False, special=False))
        if ours != theirs:
            log.warning("the Hugging Face tokenizer and %s's own tokenizer split a probe text differently "
                        "(%d vs %d tokens); scores use the Hugging Face ids", self.path.name, len(ours), len(theirs))

    def close(self) -> None:
        """Free llama.cpp's model and context."""
        self.llm.close()


def resolve_backend(spec: str | Path, backend: str) -> str:
    """``llamacpp`` or ``transformers`` for ``spec``; ``auto`` = llama.cpp for a .gguf file when it is installed."""
    if backend not in ("auto", "llamacpp", "transformers"):
        raise LowbitError(f"unknown backend {backend!r}; use auto, llamacpp or transformers")
    is_gguf = str(spec).endswith(".gguf") and Path(spec).is_file()
    if backend == "llamacpp" and not is_gguf:
        raise LowbitError(f"--backend llamacpp runs .gguf files only, and {spec} is not one; "
                          "use --backend transformers (or auto)")
    if backend != "auto":
        return backend
    if not is_gguf:
        return "transformers"
    if llama_cpp_available():
        return "llamacpp"
    log.info("llama-cpp-python is not installed: %s is evaluated dequantized through transformers (%s)",
             Path(spec).name, INSTALL)
    return "transformers"


def gguf_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer transformers builds from a GGUF's own vocabulary."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers could not build a tokenizer from {path} ({exc}). "
                             "Fix: pass --reference with the model the GGUF was made from.") from exc


def load_llamacpp(path: str | Path, ctx: int, threads: int | None = None, *,
                  tokenizer: bool = True) -> tuple[LlamaCppLogits, Any]:
    """(llama.cpp logits callable, tokenizer from the GGUF or None) for ``lowbit.jobs.load_any``."""
    model = LlamaCppLogits(path, ctx, threads)
    return model, gguf_tokenizer(path) if tokenizer else None
