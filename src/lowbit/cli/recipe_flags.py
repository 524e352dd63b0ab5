"""Building a :class:`~lowbit.recipe.Recipe` from ``lowbit quantize``'s flags, on top of a recipe file."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import LowbitError
from lowbit.core.presets import lookup_scheme
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline.awq import AWQConfig
from lowbit.pipeline.registry import entry_for, method_entry
from lowbit.recipe.schema import Calibration, Export, Override, Recipe

log = logging.getLogger(__name__)


def method_label(cfg: Any) -> str:
    """``awq+gptq`` for AWQ with an inner GPTQ, else the registry name."""
    name = entry_for(cfg).name
    return "awq+gptq" if isinstance(cfg, AWQConfig) and isinstance(cfg.inner, GPTQConfig) else name


def _default_method(label: str) -> Any:
    if label == "awq+gptq":
        return AWQConfig(inner=GPTQConfig())
    return method_entry(label).config()


def _scheme(a: argparse.Namespace, base: Recipe | None) -> Any:
    scheme = lookup_scheme(a.scheme) if a.scheme is not None else base.scheme if base else None
    if scheme is None:
        raise LowbitError("give --scheme (e.g. W4A16, NF4, FP8) or --recipe FILE")
    if isinstance(scheme, DataTypeScheme):
        changes: dict[str, Any] = {}
        if a.group_size is not None:
            changes["block_size"] = None if a.group_size in (-1, 0) else a.group_size
        if a.double_quant:
            changes["double_quant"] = True
        if a.threshold is not None:
            changes["threshold"] = a.threshold
        return scheme.with_options(**changes) if changes else scheme
    if a.double_quant or a.threshold is not None:
        raise LowbitError("--double-quant and --threshold apply to the data-type schemes (NF4/FP4, INT8-LLM)")
    if a.group_size is not None:
        return scheme.with_options(group_size=None if a.group_size in (-1, 0) else a.group_size)
    return scheme


def _method(a: argparse.Namespace, base: Recipe | None, flags: dict[str, tuple[tuple[str, ...], str, Any]],
            scheme: Any) -> Any:
    label = a.method or (method_label(base.method) if base else "rtn")
    cfg = base.method if base and method_label(base.method) == label else _default_method(label)
    if isinstance(scheme, DataTypeScheme) and label != "rtn":
        raise LowbitError(f"{scheme.label} is a data-type scheme with its own rounding: --method {label} does not "
                          "apply; drop --method")
    outer: dict[str, Any] = {}
    inner: dict[str, Any] = {}
    for dest, (methods, field, fn) in flags.items():
        v = getattr(a, dest)
        if v is None:
            continue
        if label not in methods:
            flag = "--" + dest.replace("_", "-")
            raise LowbitError(f"{flag} goes with --method {' or '.join(methods)}, not {label}")
        v = fn(v) if fn else v
        in_gptq = label == "awq+gptq" and field in {f.name for f in dataclasses.fields(GPTQConfig)}
        (inner if in_gptq else outer)[field] = v
    try:
        if inner:
            cfg = dataclasses.replace(cfg, inner=dataclasses.replace(cfg.inner, **inner))
        return dataclasses.replace(cfg, **outer) if outer else cfg
    except (ValueError, TypeError) as e:
        raise LowbitError(str(e)) from None


def _override(spec: str) -> Override:
    target, sep, scheme = spec.rpartition("=")
    if not sep or not target or not scheme:
        raise LowbitError(f"--override {spec!r}: expected TARGET=SCHEME, e.g. 're:.*down_proj=W8A16'")
    if scheme.lower() in ("16bit", "16-bit", "keep", "none"):
        return Override((target,), keep=True)
    return Override((target,), scheme=lookup_scheme(scheme))


def build_recipe(a: argparse.Namespace, flags: dict[str, tuple[tuple[str, ...], str, Any]]) -> Recipe:
    """The recipe of the flags over ``--recipe`` (see :mod:`lowbit.cli.quantize`)."""
    base = Recipe.from_file(a.recipe) if a.recipe else None
    scheme = _scheme(a, base)
    method = _method(a, base, flags, scheme)
    cal = base.calibration if base else Calibration()
    cal_changes = {k: v for k, v in (("corpus", a.calib), ("samples", a.calib_samples), ("length", a.calib_len),
                                     ("seed", a.seed)) if v is not None}
    exp = base.export if base else Export()
    exp_changes = {k: v for k, v in (("format", a.format), ("dtype", a.dtype)) if v is not None}
    recipe = Recipe(scheme, method, dataclasses.replace(cal, **cal_changes), dataclasses.replace(exp, **exp_changes),
                    (*(base.ignore if base else ()), *(a.ignore or ())),
                    (*(base.overrides if base else ()), *(_override(o) for o in a.override or ())))
    if base is not None:
        _log_changes(base, recipe, a.recipe)
    return recipe


def _log_changes(old: Recipe, new: Recipe, path: str) -> None:
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): d}

    a, b = flat(old.to_dict()), flat(new.to_dict())
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            log.info("the flags change %s's %s: %r -> %r", path, k, a.get(k), b.get(k))
