"""Spend a byte budget where it buys the most: one candidate per tensor, minimising the predicted loss.

The predicted loss of a whole assignment is the sum of the per-tensor costs of
:class:`~lowbit.mixed.sensitivity.Sensitivity` (second order, tensors taken one at a time), so the choice is
a multiple-choice knapsack::

    minimise   sum_u cost_u(c_u)     subject to   sum_u bytes_u(c_u) <= B

over *units*: a tensor, or tensors an engine needs stored alike (compressed-tensors for vLLM: q/k/v and
gate/up, which vLLM fuses into one matrix; their costs and bytes add). GGUF has no such rule, and the row-size
rule (a type fits only where its block divides the row) is the candidate's own ``fits``.

Solved exactly by dynamic programming over bytes counted in grains of ``B / 2^17`` (each candidate's bytes
rounded *up*, so the result never exceeds ``B``; the rounding leaves at most ``units x grain`` bytes unused,
about 0.1% of ``B`` for 170 units), then the slack is offered to upgrades in order of cost saved per byte.
Ties go to the smaller candidate, then the earlier one: the result is deterministic.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from lowbit.core.errors import LowbitError

log = logging.getLogger(__name__)
GRAINS = 1 << 17


@dataclass(frozen=True)
class Unit:
    """Tensors that take one candidate together; ``options[i] = (candidate index, cost, bytes)``."""

    tensors: tuple[str, ...]
    options: tuple[tuple[int, float, int], ...]


@dataclass
class Solution:
    """The chosen candidate index of each unit, with the totals."""

    choice: list[int]  # option index within each unit
    cost: float
    nbytes: int


def solve(units: list[Unit], budget: int, grains: int = GRAINS) -> Solution:
    """Exact multiple-choice knapsack on a byte grid (see the module docstring)."""
    if not units:
        raise LowbitError("nothing to allocate: no tensor has a candidate")
    least = sum(min(o[2] for o in u.options) for u in units)
    if least > budget:
        raise LowbitError(f"the budget ({budget / 1e6:.2f} MB for the chosen tensors) is below the smallest "
                          f"assignment ({least / 1e6:.2f} MB, every tensor at its smallest candidate); raise it or "
                          "add smaller candidates")
    grain = max(1, math.ceil(budget / grains))
    G = budget // grain
    best = np.zeros(G + 1)  # best[b]: least cost of the units so far within b grains
    picks = np.zeros((len(units), G + 1), dtype=np.int16)
    for k, u in enumerate(units):
        new = np.full(G + 1, np.inf)
        for i, (_, cost, nbytes) in enumerate(u.options):
            w = math.ceil(nbytes / grain)
            if w > G:
                continue
            cand = np.full(G + 1, np.inf)
            cand[w:] = best[: G + 1 - w] + cost
            better = cand < new
            new[better] = cand[better]
            picks[k, better] = i
        best = new
    if not np.isfinite(best[G]):  # the grain's rounding up can exclude what fits exactly
        raise LowbitError("the budget is too tight for the byte grid; raise it slightly")
    choice = [0] * len(units)
    b = G
    for k in range(len(units) - 1, -1, -1):
        i = int(picks[k, b])
        choice[k] = i
        b -= math.ceil(units[k].options[i][2] / grain)
    choice = _fill(units, choice, budget)
    return Solution(choice, sum(u.options[i][1] for u, i in zip(units, choice, strict=True)),
                    sum(u.options[i][2] for u, i in zip(units, choice, strict=True)))


def _fill(units: list[Unit], choice: list[int], budget: int) -> list[int]:
    """Spend the slack the grid left: repeatedly take the upgrade saving the most cost per byte that fits."""
    used = sum(u.options[i][2] for u, i in zip(units, choice, strict=True))
    while True:
        best: tuple[float, int, int] | None = None
        for k, u in enumerate(units):
            _, c0, b0 = u.options[choice[k]]
            for i, (_, c, b) in enumerate(u.options):
                if c < c0 and b > b0 and used + b - b0 <= budget:
                    gain = (c0 - c) / (b - b0)
                    if best is None or gain > best[0]:
                        best = (gain, k, i)
                elif c < c0 and b <= b0:  # strictly better and no larger: always take
                    best = (math.inf, k, i)
        if best is None:
            return choice
        _, k, i = best
        used += units[k].options[i][2] - units[k].options[choice[k]][2]
        choice[k] = i
