"""Budgets and allocations: how many bytes the chosen tensors may take, the chosen candidate of each, and the
artifact descriptions that follow from it (a :class:`~lowbit.recipe.Recipe` with per-layer overrides for
compressed-tensors, a per-tensor type map for GGUF).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lowbit.core.errors import LowbitError
from lowbit.core.targets import compact_targets
from lowbit.mixed.knapsack import Unit, solve
from lowbit.mixed.sensitivity import Sensitivity
from lowbit.recipe.schema import Override, Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """Bits per weight (``bpw``) or a size cap in bytes (``max_bytes``), as the file holds them.

    GGUF: bits per weight of the whole file (every tensor, norms included, and its metadata), as
    ``GGUFReport.bits_per_weight`` counts them. compressed-tensors: bits per weight of the quantized linears
    (codes, scales, zero points, shapes: ``W4g32`` is 4.5), the figure uniform schemes are named by; ``max_bytes``
    caps the whole folder's tensors (unquantized ones in the storage dtype)."""

    bpw: float | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.max_bytes is None):
            raise LowbitError("give one budget: bits per weight or a maximum size")
        if self.bpw is not None and not 1 < self.bpw <= 32:
            raise LowbitError(f"bits per weight must lie in (1, 32], got {self.bpw}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise LowbitError(f"the maximum size must be positive, got {self.max_bytes}")

    @property
    def label(self) -> str:
        return f"{self.bpw:g} bpw" if self.bpw is not None else f"{(self.max_bytes or 0) / 1e9:.3f} GB"


_UNITS = {"GB": 10**9, "GIB": 2**30, "MB": 10**6, "MIB": 2**20}


def parse_budget(text: str | float) -> Budget:
    """``4.5`` / ``"4.5"`` (bits per weight) or ``"1.2GB"``, ``"800MB"``, ``"0.5GiB"`` (a size cap)."""
    if isinstance(text, (int, float)):
        return Budget(bpw=float(text))
    t = text.strip().upper().replace(" ", "")
    for unit, mult in _UNITS.items():
        if t.endswith(unit):
            try:
                return Budget(max_bytes=int(float(t[: -len(unit)]) * mult))
            except ValueError:
                break
    try:
        return Budget(bpw=float(t.removesuffix("BPW")))
    except ValueError:
        raise LowbitError(f"cannot read the budget {text!r}: give bits per weight (4.5) or a size (1.2GB, "
                          "800MB)") from None


@dataclass
class Allocation:
    """One candidate per tensor (``choice``: tensor name -> candidate name) and what it adds up to.

    ``tensor_bytes`` / ``values``: the allocated tensors; ``fixed_bytes`` / ``fixed_values``: the rest of the
    file; ``overhead``: metadata counted against the budget (GGUF header and tokenizer)."""

    sens: Sensitivity
    budget: Budget
    choice: dict[str, str]
    predicted: float
    tensor_bytes: int
    budget_bytes: int
    overhead: int = 0

    @property
    def values(self) -> int:
        return sum(t.numel for t in self.sens.tensors)

    @property
    def bits_per_weight(self) -> float:
        """As the budget counts them (see :class:`Budget`)."""
        if self.sens.family == "int":
            return 8 * self.tensor_bytes / self.values
        total = self.tensor_bytes + self.sens.fixed_bytes + self.overhead
        return 8 * total / (self.values + self.sens.fixed_values)

    def counts(self) -> dict[str, int]:
        """Tensors per candidate, in candidate order."""
        c = Counter(self.choice.values())
        return {k: c[k] for k in self.sens.candidates if c[k]}

    def rows(self) -> list[dict[str, Any]]:
        """Per tensor: name, shape, chosen candidate, bytes, predicted cost (the report's table)."""
        return [{"tensor": t.name, "shape": list(t.shape), "choice": self.choice[t.name],
                 "bytes": self.sens.nbytes(t, self.choice[t.name]), "cost": self.sens.cost[t.name][self.choice[t.name]]}
                for t in self.sens.tensors]

    def gguf_types(self) -> dict[str, str]:
        """GGUF tensor name -> type name (``write_gguf(types=...)``)."""
        if self.sens.family != "gguf":
            raise LowbitError("this allocation is of integer schemes; build a recipe from it (.recipe())")
        return dict(self.choice)

    def recipe(self, base: Recipe | None = None, method: Any = None) -> Recipe:
        """The allocation as a recipe: the candidate holding the most weights as ``scheme``, every other as one
        override (its layers as compact ``re:`` targets), the method of ``base`` (or ``method``) for all."""
        if self.sens.family != "int":
            raise LowbitError("this allocation is of GGUF types; write it with gguf_types()")
        weight: Counter[str] = Counter()
        for t in self.sens.tensors:
            weight[self.choice[t.name]] += t.numel
        main = max(sorted(weight), key=lambda k: (weight[k], k))
        overrides = []
        for cand in self.sens.candidates:
            if cand == main or not weight[cand]:
                continue
            names = [t.module for t in self.sens.tensors if self.choice[t.name] == cand]
            overrides.append(Override(tuple(compact_targets(names)), scheme=self.sens.candidate(cand).scheme))
        scheme = self.sens.candidate(main).scheme
        assert scheme is not None
        if base is None:
            r = Recipe(scheme) if method is None else Recipe(scheme, method)
        else:
            r = base.replace(scheme=scheme, **({"method": method} if method is not None else {}))
        return r.replace(overrides=(*r.overrides, *overrides))


def units(sens: Sensitivity) -> list[Unit]:
    """The allocation units of ``sens``: tensors grouped by ``unit``, with the candidates every member takes."""
    groups: dict[str, list[Any]] = {}
    for t in sens.tensors:
        groups.setdefault(t.unit, []).append(t)
    out = []
    for key, members in groups.items():
        options = []
        for i, c in enumerate(sens.candidates):
            if all(c in sens.cost[t.name] for t in members):
                options.append((i, sum(sens.cost[t.name][c] for t in members), sum(sens.nbytes(t, c) for t in members)))
        if not options:
            raise LowbitError(f"no candidate fits every tensor of {key}; add one whose group/block divides their rows")
        out.append(Unit(tuple(t.name for t in members), tuple(options)))
    return out


def budget_bytes(sens: Sensitivity, budget: Budget, overhead: int = 0) -> int:
    """Bytes the allocated tensors may take under ``budget`` (see :class:`Budget`)."""
    values = sum(t.numel for t in sens.tensors)
    if budget.max_bytes is not None:
        return budget.max_bytes - sens.fixed_bytes - overhead
    assert budget.bpw is not None
    if sens.family == "int":
        return int(budget.bpw * values / 8)
    return int(budget.bpw * (values + sens.fixed_values) / 8) - sens.fixed_bytes - overhead


def allocate_from(sens: Sensitivity, budget: Budget, overhead: int = 0, *, measured: bool = False) -> Allocation:
    """The least predicted loss within ``budget`` (``measured``: use the measured costs where present)."""
    if measured:
        sens = _with_measured(sens)
    limit = budget_bytes(sens, budget, overhead)
    us = units(sens)
    sol = solve(us, limit)
    choice: dict[str, str] = {}
    for u, k in zip(us, sol.choice, strict=True):
        for t in u.tensors:
            choice[t] = sens.candidates[u.options[k][0]]
    a = Allocation(sens, budget, choice, sol.cost, sol.nbytes, limit, overhead)
    log.info("allocation under %s: %.3f bits/weight, predicted KLD %.4g, %s", budget.label, a.bits_per_weight,
             a.predicted, a.counts())
    return a


def _with_measured(sens: Sensitivity) -> Sensitivity:
    missing = [t.name for t in sens.tensors if any(c not in sens.measured.get(t.name, {}) for c in sens.cost[t.name])]
    if missing:
        raise LowbitError(f"{len(missing)} tensor(s) lack a measurement for some candidate (e.g. {missing[0]}); "
                          "measure every candidate or allocate on the estimate")
    return Sensitivity(sens.model, sens.family, sens.candidates, sens.tensors, sens.measured, sens.measured,
                       sens.method, sens.fixed_bytes, sens.fixed_values, sens.scale_bytes, sens.meta)
