"""The configurations ``lowbit compare`` weighs, by short name, and the menus of them.

=============================== ================================================================
``reference``                   the source model as it is (16-bit)
``SCHEME[:METHOD]``             a recipe: ``W8A16``, ``W4A16:gptq``, ``W4A16_ASYM:awq``, ``NF4``,
                                ``INT8-LLM``, ``FP8``, ``W8A8:smoothquant`` (method default ``rtn``)
``...+qat``                     that recipe, then quantization-aware training (``lowbit.qat``)
``gguf:TYPE[+imatrix]``         a GGUF file of llama.cpp's ``TYPE`` (``Q4_K_M``, ``Q8_0`` ...),
                                optionally with an importance matrix from the calibration text
``mix@BPW[:METHOD]``            per-layer schemes chosen for ``BPW`` bits per weight (``lowbit.mixed``)
``gguf:mix@BPW[+imatrix]``      per-tensor GGUF types for ``BPW`` bits per weight
``PATH.yaml`` / ``PATH.json``   any recipe file (lowbit's or llm-compressor's)
=============================== ================================================================
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.presets import lookup_scheme
from lowbit.pipeline.registry import build_method
from lowbit.recipe.parse import parse_method
from lowbit.recipe.schema import Recipe

KINDS = ("reference", "recipe", "gguf")


@dataclass(frozen=True)
class Config:
    """One configuration: ``kind`` is ``reference``, ``recipe`` (a lowbit artifact folder) or ``gguf``."""

    name: str
    kind: str
    recipe: Recipe | None = None
    gguf_type: str | None = None
    imatrix: bool = False
    budget: float | None = None  # mix@BPW: bits per weight the allocator spends
    qat: bool = False

    def key(self, extra: dict[str, Any]) -> str:
        """A short hash of everything that determines the artifact (its cache folder's name)."""
        d = {"kind": self.kind, "recipe": None if self.recipe is None else self.recipe.to_dict(),
             "gguf": self.gguf_type, "imatrix": self.imatrix, "budget": self.budget, "qat": self.qat, **extra}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def family(self) -> str:
        """Which engine serves it: ``gguf`` (llama.cpp) or ``hf`` (transformers / vLLM)."""
        return "gguf" if self.kind == "gguf" else "hf"


_MIX = re.compile(r"^mix@(\d+(?:\.\d+)?)$", re.IGNORECASE)


def _bpw(name: str, text: str) -> float:
    """The bits per weight of ``mix@B``, checked as :class:`lowbit.mixed.Budget` checks it (before any model
    loads)."""
    from lowbit.mixed.budget import Budget

    bpw = float(text)
    try:
        Budget(bpw=bpw)
    except LowbitError as e:
        raise LowbitError(f"config {name!r}: {e}") from e
    return bpw


def parse_config(name: str) -> Config:
    """The :class:`Config` a short name or recipe path stands for (see the module docstring)."""
    text = name.strip()
    if not text:
        raise LowbitError("an empty config name; write e.g. W4A16:gptq or gguf:Q4_K_M")
    if text.lower() in ("reference", "ref", "bf16", "16-bit"):
        return Config("reference", "reference")
    if text.endswith((".yaml", ".yml", ".json")):
        return Config(Path(text).stem, "recipe", recipe=Recipe.from_file(text))
    qat = text.lower().endswith("+qat")
    body = text[:-4] if qat else text
    if body.lower().startswith("gguf:"):
        if qat:
            raise LowbitError(f"{name}: QAT configs are lowbit artifacts; GGUF files come from lowbit gguf")
        spec = body[5:]
        imatrix = spec.lower().endswith("+imatrix")
        spec = spec[:-8] if imatrix else spec
        mix = _MIX.match(spec)
        if mix:
            return Config(text, "gguf", gguf_type="mix", imatrix=imatrix, budget=_bpw(name, mix.group(1)))
        from lowbit.formats.gguf.ftypes import FILE_TYPES

        t = spec.upper()
        if t not in FILE_TYPES:
            raise LowbitError(f"{name}: unknown GGUF type {spec!r}; known: {', '.join(FILE_TYPES)}")
        return Config(text, "gguf", gguf_type=t, imatrix=imatrix)
    scheme_part, _, method_part = body.partition(":")
    mix = _MIX.match(scheme_part)
    budget = _bpw(name, mix.group(1)) if mix else None
    try:
        method = parse_method(method_part or ("gptq" if mix else "rtn"), "method")
        if mix:
            return Config(text, "recipe", recipe=Recipe(lookup_scheme("W4A16"), method),
                          budget=budget, qat=qat)
        scheme = lookup_scheme(scheme_part)
        build_method(method, scheme, torch.bfloat16)  # refuses a method that cannot produce the scheme
    except LowbitError as e:
        raise LowbitError(f"config {name!r}: {e}") from None
    return Config(text, "recipe", recipe=Recipe(scheme, method), qat=qat)


#: the default menu spans the method families (the issue's list); ``lowbit run`` uses it
DEFAULT_MENU = ("reference", "W8A16", "W4A16:imatrix-rtn", "W4A16:gptq", "W4A16:awq", "NF4", "INT8-LLM", "FP8",
                "gguf:Q8_0", "gguf:Q4_K_M", "gguf:Q4_K_M+imatrix")
#: the full menu adds the other integer grids, SmoothQuant, FP4 and more GGUF types
FULL_MENU = (*DEFAULT_MENU, "W4A16", "W4A16_ASYM:gptq", "W3A16:gptq", "W3A16_ASYM:awq", "W8A8:smoothquant", "FP4",
             "FP8_DYNAMIC", "gguf:Q6_K", "gguf:Q5_K_M", "gguf:Q4_0", "gguf:Q3_K_M+imatrix", "gguf:Q2_K+imatrix")
MENUS = {"default": DEFAULT_MENU, "full": FULL_MENU}


def parse_menu(configs: str | None = None, menu: str | None = None) -> list[Config]:
    """``--configs a,b,c`` or ``--menu default|full|FILE`` (a file: one name per line, ``#`` comments, or a
    YAML list); ``reference`` is always included, first."""
    if configs and menu:
        raise LowbitError("give --configs or --menu, not both")
    if configs:
        names = [c for c in configs.split(",") if c.strip()]
    elif menu is None or menu in MENUS:
        names = list(MENUS[menu or "default"])
    else:
        p = Path(menu)
        if not p.is_file():
            raise LowbitError(f"--menu {menu!r}: not default, full, or an existing file")
        import yaml

        data = yaml.safe_load(p.read_text())
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            names = data
        else:
            names = [ln.split("#")[0].strip() for ln in p.read_text().splitlines() if ln.split("#")[0].strip()]
    out = [parse_config(n) for n in names]
    if not any(c.kind == "reference" for c in out):
        out.insert(0, Config("reference", "reference"))
    seen: set[str] = set()
    for c in out:
        if c.name in seen:
            raise LowbitError(f"config {c.name!r} appears twice in the menu")
        seen.add(c.name)
    return out
