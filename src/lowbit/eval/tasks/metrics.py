"""lm-eval's metrics and standard errors.

Per multiple-choice document with log-likelihoods ``ll_i`` and choice strings ``s_i``:
``pred = argmax_i ll_i`` and ``pred_norm = argmax_i ll_i / len(s_i)`` (characters; the first
maximum on ties, as ``np.argmax``); ``acc = [pred == gold]``, ``acc_norm = [pred_norm == gold]``.
LAMBADA: ``acc = [greedy]``, ``perplexity = exp(-mean_d ll_d)``.

Standard errors as lm-eval 0.4 computes them (``lm_eval.api.metrics``): a mean's is
``sqrt(sum (x - mean)^2 / (n - 1)) / sqrt(n)``; the perplexity's is bootstrapped:
``iters // 1000`` chunks, chunk ``i`` draws 1000 resamples ``random.Random(i).choices(xs, k=n)``,
and the error is the sample standard deviation of the 1000 * chunks resampled perplexities. The
draws are reproduced exactly: numpy's MT19937 is given Python's state for seed ``i`` and
``floor(u * n)`` of its doubles are Python's ``choices`` indices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_ITERS = 100_000  # lm-eval's default


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def mean_stderr(xs: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n); None for fewer than two values."""
    n = len(xs)
    if n < 2:
        return None
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def perplexity(lls: Sequence[float]) -> float:
    """lm-eval's ``perplexity`` aggregation: ``exp(-mean(ll))`` over documents."""
    return math.exp(-mean(lls))


def _python_random_doubles(seed: int, count: int) -> np.ndarray:
    """The first ``count`` values of ``random.Random(seed).random()``, drawn by numpy from the same state."""
    state = random.Random(seed).getstate()[1]
    rs = np.random.RandomState()
    rs.set_state(("MT19937", np.asarray(state[:624], dtype=np.uint32), state[624], 0, 0.0))
    return rs.random_sample(count)


def perplexity_stderr(lls: Sequence[float], iters: int = BOOTSTRAP_ITERS) -> float | None:
    """lm-eval's bootstrap standard error of :func:`perplexity` (same resamples, vectorised)."""
    n = len(lls)
    chunk = min(1000, iters)
    if n < 2 or chunk < 1 or iters // chunk < 1:
        return None
    xs = np.asarray(lls, dtype=np.float64)
    res = []
    for i in range(iters // chunk):
        idx = np.floor(_python_random_doubles(i, chunk * n) * float(n)).astype(np.int64).reshape(chunk, n)
        res.append(np.exp(-xs[idx].sum(axis=1) / n))
    values = np.concatenate(res)
    return float(math.sqrt(((values - values.mean()) ** 2).sum() / (len(values) - 1)))


def choose(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: the argmax of the log-likelihoods, raw and per character of the choice."""
    ll = np.asarray(lls, dtype=np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        return int(np.argmax(ll)), int(np.argmax(ll / lengths))


def aggregate(metric_names: Sequence[str], per_doc: dict[str, list[float]], bootstrap_iters: int = BOOTSTRAP_ITERS
              ) -> tuple[dict[str, float], dict[str, float | None]]:
    """(metrics, standard errors) from per-document values: ``acc``/``acc_norm`` 0/1 values, ``perplexity``
    the documents' log-likelihoods."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for name in metric_names:
        xs = per_doc[name]
        if name == "perplexity":
            metrics[name], stderr[name] = perplexity(xs), perplexity_stderr(xs, bootstrap_iters)
        else:
            metrics[name], stderr[name] = mean(xs), mean_stderr(xs)
    return metrics, stderr
