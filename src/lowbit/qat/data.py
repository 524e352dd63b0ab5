"""Training windows for QAT, and the check that training text and evaluation text are disjoint.

Disjointness is measured as GPT-3's contamination study does (Brown et al. 2020, appendix C): the
fraction of the training windows' token ``n``-grams (``n = 13``) that also occur anywhere in the
evaluation text's tokens. Unrelated English corpora share almost none (a quote, a boilerplate
sentence); training on the evaluation text shares all of them. A run is refused above
``max_overlap`` (1% by default), and the figures go into the artifact's record either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core.errors import LowbitError

NGRAM = 13


@dataclass(frozen=True)
class Overlap:
    """Training n-grams found in the evaluation text."""

    train_corpus: str
    eval_corpus: str
    n: int
    train_ngrams: int
    shared: int

    @property
    def fraction(self) -> float:
        return self.shared / max(1, self.train_ngrams)

    def to_dict(self) -> dict[str, Any]:
        return {"train_corpus": self.train_corpus, "eval_corpus": self.eval_corpus, "ngram": self.n,
                "train_ngrams": self.train_ngrams, "shared": self.shared, "fraction": self.fraction}


def _ngrams(ids: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def overlap(train: torch.Tensor, eval_ids: torch.Tensor, train_corpus: str, eval_corpus: str,
            n: int = NGRAM) -> Overlap:
    """How many of the distinct ``n``-grams of the training windows ``train (k, T)`` occur in ``eval_ids``."""
    ev = _ngrams(eval_ids.reshape(-1).tolist(), n)
    tr: set[tuple[int, ...]] = set()
    for row in train.tolist():
        tr |= _ngrams(row, n)
    return Overlap(train_corpus, eval_corpus, n, len(tr), len(tr & ev))


def check_disjoint(ov: Overlap, max_overlap: float) -> None:
    """Refuse training text that overlaps the evaluation text beyond ``max_overlap`` (a fraction)."""
    if ov.fraction > max_overlap:
        raise LowbitError(f"the training text ({ov.train_corpus}) shares {ov.shared} of its {ov.train_ngrams} "
                          f"{ov.n}-grams ({100 * ov.fraction:.2f}%) with the evaluation text ({ov.eval_corpus}), more "
                          f"than {100 * max_overlap:.2f}%: training on evaluation text inflates every result. Train on "
                          "another corpus (--calib c4, python-docs, your own file)")
