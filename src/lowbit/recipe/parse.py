"""Parsing recipe data: frozen config dataclasses built from mappings, every error naming the key's path.

Generic over config classes (any frozen dataclass with simple field types); :mod:`lowbit.recipe.schema`
uses it for recipes and :mod:`lowbit.recipe.llmc` for translated llm-compressor recipes. A method is a
name (``gptq``: its defaults) or ``{name: gptq, damp: 0.01, ...}``; a scheme a preset name or its
mapping (``{bits: 4, group_size: 128, symmetric: true}``, ``{dtype: nf4, block_size: 64}``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lowbit.core.errors import LowbitError, RecipeError
from lowbit.core.presets import Scheme, lookup_scheme, scheme_from_dict
from lowbit.pipeline.registry import entry_for, method_entry

ROOT = "recipe"


def _err(path: str, msg: str) -> RecipeError:
    return RecipeError(f"{path}: {msg}")


def _type_ok(tp: Any, v: Any) -> bool:
    """Whether ``v`` fits the annotation ``tp`` (the simple types configs use)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(a, v) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    if origin is tuple:
        return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
    return isinstance(v, tp) if isinstance(tp, type) else True


def build_config(cls: type, data: Any, path: str, special: dict[str, Any] | None = None) -> Any:
    """``cls(**data)`` for a frozen config dataclass: unknown keys, wrong types and invalid values are
    errors naming ``path.key``. ``special`` maps a field to a parser ``(value, path) -> value``."""
    if not isinstance(data, dict):
        raise _err(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kw = {}
    for k, v in data.items():
        if k not in names:
            raise _err(f"{path}.{k}", f"unknown key; {cls.__name__} has: {', '.join(names)}")
        if special and k in special:
            kw[k] = special[k](v, f"{path}.{k}")
            continue
        if not _type_ok(hints[k], v):
            raise _err(f"{path}.{k}", f"expected {_tname(hints[k])}, got {v!r}")
        kw[k] = tuple(v) if isinstance(v, list) else v
    try:
        return cls(**kw)
    except (LowbitError, ValueError, TypeError) as e:
        raise _err(path, str(e)) from None


def _tname(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_scheme(v: Any, path: str) -> Scheme:
    """A scheme from a preset name or its mapping form."""
    try:
        if isinstance(v, str):
            return lookup_scheme(v)
        if isinstance(v, dict):
            return scheme_from_dict(v)
    except (LowbitError, KeyError, TypeError) as e:
        raise _err(path, str(e)) from None
    raise _err(path, f"expected a scheme name (W4A16, NF4, ...) or a mapping, got {v!r}")


def parse_method(v: Any, path: str) -> Any:
    """A method config from a name (its defaults) or ``{name: ..., option: value, ...}``."""
    if isinstance(v, str):
        v = {"name": v}
    if not isinstance(v, dict) or not isinstance(v.get("name"), str):
        raise _err(path, f"expected a method name or a mapping with 'name', got {v!r}")
    body = {k: x for k, x in v.items() if k != "name"}
    if v["name"] == "awq+gptq":  # the CLI's spelling
        body.setdefault("inner", "gptq")
        v = {**v, "name": "awq"}
    try:
        entry = method_entry(v["name"])
    except LowbitError as e:
        raise _err(f"{path}.name", str(e)) from None
    special = {"inner": _inner} if "inner" in {f.name for f in dataclasses.fields(entry.config)} else None
    return build_config(entry.config, body, path, special)


def method_to_dict(cfg: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": entry_for(cfg).name}
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        d[f.name] = method_to_dict(val) if dataclasses.is_dataclass(val) else val
    return d


def parse_targets(v: Any, path: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise _err(path, f"expected a list of module names or re: patterns, got {v!r}")
    return tuple(v)


def _inner(v: Any, path: str) -> Any:
    return None if v is None else parse_method(v, path)


#: a recipe file is a few kilobytes; larger ones, aliases, deep nesting and huge trees are refused
MAX_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 64
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: 30x faster


def _check_tree(data: Any, source: str) -> None:
    """Refuse YAML aliases (a shared node: a recipe never needs one, and a few nested aliases expand into
    billions of nodes for whoever walks the tree), nesting deeper than :data:`MAX_DEPTH` and trees of more
    than :data:`MAX_NODES` nodes; linear in the size of the parsed tree."""
    seen: set[int] = set()
    stack = [(data, 0)]
    nodes = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            raise RecipeError(f"{source}: the recipe nests deeper than {MAX_DEPTH} levels or holds more than "
                              f"{MAX_NODES} values; a recipe is a short mapping (see recipe.yaml in an artifact)")
        if isinstance(v, (dict, list)):
            if id(v) in seen:
                raise RecipeError(f"{source}: YAML aliases (*name) are not allowed in recipes; write the value out")
            seen.add(id(v))
            stack.extend((x, depth + 1) for x in (list(v.keys()) + list(v.values()) if isinstance(v, dict) else v))


def _depth_bound(text: str) -> int:
    """An upper bound of the text's YAML nesting depth, without parsing: the deepest bracket nesting (quotes
    ignored, so over-counted) plus, on the worst line, its indentation and its ``- `` markers. libyaml's
    parser recurses in C: a few hundred thousand levels crash the process (segfault) instead of raising."""
    flow = deepest = 0
    for ch in text:
        if ch in "[{":
            flow += 1
            deepest = max(deepest, flow)
        elif ch in "]}":
            flow = max(flow - 1, 0)
    block = max((len(line) - len(line.lstrip(" ")) + line.count("- ") for line in text.splitlines()), default=0)
    return deepest + block


def parse_text(text: str, source: str) -> Any:
    """The data of a YAML or JSON text (JSON is YAML); a syntax error names ``source`` and the line."""
    if len(text) > MAX_BYTES:
        raise RecipeError(f"{source}: {len(text)} characters; a recipe is at most {MAX_BYTES} (a few KB in practice)")
    if _depth_bound(text) > 4 * MAX_DEPTH:
        raise RecipeError(f"{source}: nested too deeply to be a recipe (more than {MAX_DEPTH} levels)")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 -- a safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{source}:{where} not valid YAML/JSON ({getattr(e, 'problem', e)})") from None
    except (ValueError, RecursionError, OverflowError) as e:  # e.g. a 5000-digit integer, 10^5 nested brackets
        raise RecipeError(f"{source}: not a readable recipe ({type(e).__name__}: {str(e)[:200]})") from None
    _check_tree(data, source)
    return data


def read_data(path: str | Path) -> Any:
    """The parsed content of a recipe file."""
    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"recipe file {p} is a folder; give the recipe's file (an artifact's is {p / 'recipe.yaml'})")
    if not p.is_file():
        raise RecipeError(f"recipe file {p} not found")
    try:
        if p.stat().st_size > 4 * MAX_BYTES:
            raise RecipeError(f"recipe file {p} is {p.stat().st_size} bytes; a recipe is a few KB")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe file {p} cannot be read ({e})") from None
    return parse_text(text, str(p))
