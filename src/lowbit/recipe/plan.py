"""From a recipe and a model to a plan: each quantizable linear's scheme and method, checked, and the
block methods that carry them out (one per method config, each owning its linears).

Checks made here, before any calibration work (each error names the layer and the fix):

- every override target matches a quantizable linear (an ``ignore`` target that matches no module of
  the model is a warning: ``lm_head`` is never quantized anyway);
- linears that share an input (the architecture table's groups: q/k/v, gate/up) share one scheme and
  method, as GPTQ and AWQ solve them together and vLLM fuses them;
- one artifact holds one kind of scheme (integer grids, W8A8, or one number format), besides 16-bit layers;
- one config per method (two different GPTQ configs cannot share a run);
- every group size divides its linear's input dimension, and each method can produce its scheme;
- a method that folds scales (AWQ, SmoothQuant) has the architecture table's mapping (not a derived table).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import RecipeError, SchemeError
from lowbit.core.presets import Scheme
from lowbit.models.archs import ArchSpec, get_arch
from lowbit.pipeline.blockwise import Part, check_mappings
from lowbit.pipeline.engine import Engine
from lowbit.pipeline.quantize import named_linears
from lowbit.pipeline.registry import build_method, entry_for, scheme_kind
from lowbit.recipe.schema import Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """What one linear gets: a scheme and a method config."""

    scheme: Scheme
    method: Any


def matches(target: str, name: str, module: nn.Module | None = None) -> bool:
    """llm-compressor's target syntax: a full name, ``re:`` + a regex matched from the start, or ``Linear``."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == "Linear":
        return module is None or isinstance(module, nn.Linear)
    return target == name


def layer_choices(recipe: Recipe, names: list[str]) -> dict[str, Choice | None]:
    """Each of ``names`` (quantizable linears) -> its :class:`Choice`, or None (kept 16-bit)."""
    out: dict[str, Choice | None] = {}
    for n in names:
        c: Choice | None = Choice(recipe.scheme, recipe.method)
        for o in recipe.overrides:
            if any(matches(t, n) for t in o.targets):
                c = None if o.keep else Choice(o.scheme or recipe.scheme, o.method or recipe.method)
        if any(matches(t, n) for t in recipe.ignore):
            c = None
        out[n] = c
    return out


@dataclass
class Plan:
    """The resolved recipe on one model: choices per linear and the parts of the block engine."""

    choices: dict[str, Choice | None]
    parts: list[Part]
    methods: dict[Any, Any]  # method config -> its block method (for reports after the run)

    @property
    def kept(self) -> list[str]:
        return [n for n, c in self.choices.items() if c is None]

    def schemes(self) -> list[Scheme]:
        """The distinct schemes of the quantized linears, in order of first use."""
        return list(dict.fromkeys(c.scheme for c in self.choices.values() if c is not None))


def check_targets(recipe: Recipe, model: nn.Module, names: list[str]) -> None:
    for i, o in enumerate(recipe.overrides):
        for t in o.targets:
            if not any(matches(t, n) for n in names):
                raise RecipeError(f"recipe.overrides[{i}].targets: {t!r} matches no quantizable linear of this "
                                  f"model (they are named like {names[0]!r}; use re: for a pattern)")
    modules = [n for n, _ in model.named_modules()]
    for t in recipe.ignore:
        if not any(matches(t, n, m) for n, m in model.named_modules()) and t not in modules:
            log.warning("ignore target %r matches no module of this model", t)


def check_groups(choices: dict[str, Choice | None], spec: ArchSpec, n_blocks: int) -> None:
    for i in range(n_blocks):
        for g in spec.groups:
            full = [f"{spec.blocks}.{i}.{n}" for n in g.linears]
            got = {choices.get(n) for n in full}
            if len(got) > 1:
                raise RecipeError(
                    f"{spec.blocks}.{i}: {', '.join(g.linears)} share one input: GPTQ and AWQ solve them together "
                    f"and vLLM fuses them, so they need one scheme and method; the recipe gives "
                    + "; ".join(f"{n.rsplit('.', 1)[-1]}: {_label(choices.get(n))}" for n in full))


def _label(c: Choice | None) -> str:
    return "16-bit" if c is None else f"{c.scheme.label} by {entry_for(c.method).name}"


def check_kinds(choices: dict[str, Choice | None]) -> None:
    kinds = {scheme_kind(c.scheme) for c in choices.values() if c is not None}
    if len(kinds) > 1:
        raise RecipeError(f"one artifact holds one kind of scheme besides 16-bit layers; this recipe mixes "
                          f"{' and '.join(sorted(kinds))} schemes (int: W4A16-like, w8a8: W8A8, dtype: NF4/FP8...)")
    dtypes = {c.scheme for c in choices.values() if c is not None and scheme_kind(c.scheme) != "int"}
    if len(dtypes) > 1:
        raise RecipeError(f"per-layer schemes are integer grids (W8A16, W4A16 ...); this recipe mixes "
                          f"{', '.join(s.label for s in dtypes)}")
    methods = [c.method for c in choices.values() if c is not None]
    by_kind: dict[type, set[Any]] = {}
    for m in methods:
        by_kind.setdefault(type(m), set()).add(m)
    for t, ms in by_kind.items():
        if len(ms) > 1:
            raise RecipeError(f"one config per method: this recipe gives {len(ms)} different {t.__name__}s; "
                              "give overrides a scheme only, or one shared method config")


def check_sizes(choices: dict[str, Choice | None], linears: dict[str, nn.Linear]) -> None:
    for n, c in choices.items():
        if c is not None:
            try:
                c.scheme.check_input(linears[n].in_features)
            except SchemeError as e:
                raise SchemeError(f"{n}: {e}") from None


def make_plan(recipe: Recipe, model: nn.Module, scale_dtype: torch.dtype = torch.bfloat16,
              engine: Engine | None = None) -> Plan:
    """The checked plan of ``recipe`` on ``model`` (see the module docstring)."""
    spec = get_arch(model)
    linears = dict(named_linears(model, spec))
    names = list(linears)
    check_targets(recipe, model, names)
    choices = layer_choices(recipe, names)
    if all(c is None for c in choices.values()):
        raise RecipeError("the recipe keeps every linear 16-bit: nothing to quantize")
    check_groups(choices, spec, _n_blocks(names, spec))
    check_kinds(choices)
    check_sizes(choices, linears)
    parts, methods = [], {}
    for cfg in dict.fromkeys(c.method for c in choices.values() if c is not None):
        owned = {n: c.scheme for n, c in choices.items() if c is not None and c.method == cfg}
        for s in dict.fromkeys(owned.values()):
            build_method(cfg, s, scale_dtype, engine)  # each scheme kind the method must produce
        method = build_method(cfg, next(iter(owned.values())), scale_dtype, engine)
        methods[cfg] = method
        parts.append(Part(method, owned.get))
    check_mappings(parts, spec)
    return Plan(choices, parts, methods)


def _n_blocks(names: list[str], spec: ArchSpec) -> int:
    prefix = spec.blocks + "."
    return len({n[len(prefix):].split(".", 1)[0] for n in names if n.startswith(prefix)})
