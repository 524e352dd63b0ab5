"""Every named scheme in one place: integer grids (``W4A16`` ...) and number formats (``NF4`` ...)."""

from __future__ import annotations

from typing import Any

from lowbit.core.dtypes import DT_PRESETS, DataTypeScheme
from lowbit.core.errors import SchemeError
from lowbit.core.scheme import PRESETS, QuantScheme

Scheme = QuantScheme | DataTypeScheme

#: every preset name, integer grids first
PRESET_NAMES: tuple[str, ...] = (*PRESETS, *DT_PRESETS)


def lookup_scheme(name: str) -> Scheme:
    """The preset ``name`` (case-insensitive), integer or data type; an unknown name lists them all."""
    key = name.strip().upper()
    if key in PRESETS:
        return PRESETS[key]
    if key in DT_PRESETS:
        return DT_PRESETS[key]
    raise SchemeError(f"unknown scheme {name!r}; known schemes: {', '.join(PRESET_NAMES)}")


def scheme_from_dict(d: dict[str, Any]) -> Scheme:
    """A scheme from its ``to_dict`` form (a data type when it has ``dtype``)."""
    if "dtype" in d:
        return DataTypeScheme.from_dict(d)
    return QuantScheme.from_dict(d)


def scheme_to_dict(s: Scheme) -> dict[str, Any]:
    """The exact, versioned form of ``s`` (what a recipe stores)."""
    d = s.to_dict()
    d.pop("kind", None)
    return d
