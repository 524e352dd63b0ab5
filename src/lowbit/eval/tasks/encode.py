"""Requests -> token ids exactly as lm-eval's ``HFLM.loglikelihood`` tokenizes them.

For ``(context, continuation)`` (lm-eval ``TemplateLM._encode_pair``): trailing whitespace of the
context moves to the front of the continuation; then ``whole = encode(context + continuation)``,
``ctx = encode(context)`` and the continuation's ids are ``whole[len(ctx):]``. ``encode`` is the
tokenizer's plain ``encode`` with its default special tokens (a BOS where the tokenizer adds one,
as ``HFLM`` with ``add_bos_token`` unset), without them when the text already starts with the
prefix token's text. An empty context is replaced by the prefix token (BOS, else EOS).

The model input is ``(ctx + cont)[-(max_length + 1):][:-1]`` (left-truncated as lm-eval does) and
the logits at its last ``len(cont)`` positions predict ``cont``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowbit.core.errors import DataError


@dataclass(frozen=True)
class TokenRequest:
    """Input ids (the last ``len(targets)`` positions are scored) and the target ids they predict."""

    input_ids: tuple[int, ...]
    targets: tuple[int, ...]


def max_length_of(config: Any, tokenizer: Any, default: int = 2048) -> int:
    """lm-eval's ``resolve_max_length``: the text config's, then the config's ``n_positions`` /
    ``max_position_embeddings`` / ``n_ctx``, then the tokenizer's ``model_max_length``, then ``default``."""
    for cfg in (getattr(config, "text_config", None), config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000_000:
        return value
    return default


class Encoder:
    """lm-eval's request tokenization for one tokenizer (context encodings cached)."""

    def __init__(self, tokenizer: Any, max_length: int = 2048) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
        self.prefix_token_id: int | None = bos if bos is not None else eos
        self._prefix_text = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        self._cache: dict[str, list[int]] = {}

    def tok_encode(self, text: str) -> list[int]:
        """``HFLM.tok_encode``: default special tokens unless the text starts with the prefix token's text."""
        if self._prefix_text and text.startswith(self._prefix_text):
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(text))

    def _encode_context(self, context: str) -> list[int]:
        ids = self._cache.get(context)
        if ids is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            ids = self._cache[context] = self.tok_encode(context)
        return ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as ``HFLM.loglikelihood`` computes them."""
        if context == "":
            if self.prefix_token_id is None:
                raise DataError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
            cont = list(self.tokenizer.encode(continuation, add_special_tokens=False))
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        ctx = self._encode_context(context)
        whole = self.tok_encode(context + continuation)
        return ctx, whole[len(ctx):]

    def encode(self, context: str, continuation: str, where: str = "") -> TokenRequest:
        """The model input and targets of one request; DataError when the continuation has no tokens."""
        ctx, cont = self.encode_pair(context, continuation)
        if not cont:
            raise DataError(f"{where}: the continuation {continuation!r:.40} has no tokens of its own after "
                            f"the context; every choice must add text")
        if not ctx:
            raise DataError(f"{where}: the context {context!r:.40} has no tokens")
        if len(cont) > self.max_length:
            raise DataError(f"{where}: the continuation has {len(cont)} tokens, more than the model's context "
                            f"{self.max_length}")
        full = (ctx + cont)[-(self.max_length + 1):]
        return TokenRequest(tuple(full[:-1]), tuple(cont))
