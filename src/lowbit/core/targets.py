"""Layer targets, as llm-compressor and compressed-tensors spell them, and compact target lists.

A target is a module's full name (``model.layers.0.mlp.down_proj``), ``re:`` and a regular
expression matched from the start of the name (``re:.*down_proj``), or the class name ``Linear``.
"""

from __future__ import annotations

import re
from collections import defaultdict

_INDEXED = re.compile(r"^(.*?\.)(\d+)\.(.+)$")


def matches(target: str, name: str, is_linear: bool = True) -> bool:
    """Whether ``target`` selects the module ``name`` (``is_linear``: the module is a linear)."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == "Linear":
        return is_linear
    return target == name


def compact_targets(names: list[str]) -> list[str]:
    """Targets selecting exactly ``names``: one ``re:`` pattern per set of layer indices sharing the same
    module suffixes (``re:^model\\.layers\\.(?:0|3)\\.(?:mlp\\.down_proj)$``), exact names otherwise."""
    by_prefix: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    plain = []
    for n in names:
        m = _INDEXED.match(n)
        if m is None:
            plain.append(n)
        else:
            by_prefix[m.group(1)][m.group(3)].add(int(m.group(2)))
    out = []
    for prefix, suffixes in by_prefix.items():
        by_layers: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for suffix, idx in suffixes.items():
            by_layers[tuple(sorted(idx))].append(suffix)
        for key, sfx in by_layers.items():
            layers = "|".join(str(i) for i in key)
            mods = "|".join(re.escape(s) for s in sorted(sfx))
            out.append(f"re:^{re.escape(prefix)}(?:{layers})\\.(?:{mods})$")
    return out + plain
