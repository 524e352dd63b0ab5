"""The budget flags of ``lowbit gguf`` and ``lowbit quantize`` (``--bpw``, ``--max-size``, ``--sensitivity``,
``--candidates``), and the per-tensor report of an allocation: one row per block, one column per tensor kind."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from lowbit.cli.common import console, say, table
from lowbit.core.errors import LowbitError


def add_budget_flags(p: argparse.ArgumentParser, family: str) -> None:
    """The budget flags, in their own group; ``family`` is ``gguf`` or ``int``."""
    what = "the file's bits per weight (every tensor and the metadata)" if family == "gguf" else \
        "bits per weight of the quantized linears (codes, scales, zero points: W4g32 is 4.5)"
    m = p.add_argument_group("mixed precision (a per-tensor choice from measured sensitivity)")
    m.add_argument("--bpw", type=float, default=None, help=f"budget in bits per weight: {what}")
    m.add_argument("--max-size", default=None, metavar="SIZE", help="budget as a size cap (e.g. 250MB, 1.2GB)")
    m.add_argument("--sensitivity", default=None, metavar="FILE",
                   help="a `lowbit sensitivity` file to allocate from (default: computed now)")
    m.add_argument("--candidates", default=None, help="what each tensor may become: " + (
        "GGUF types, e.g. Q3_K,Q4_K,Q5_K,Q6_K,Q4_0,Q5_0,Q8_0" if family == "gguf" else
        "schemes, e.g. W3,W4,W4g32,W8c (W4 = 4 bits group 128 symmetric, a suffix = asymmetric)"))
    m.add_argument("--sens-samples", type=int, default=8, help="calibration sequences of the sensitivity pass")
    m.add_argument("--sens-len", type=int, default=512, help="tokens per sequence of the sensitivity pass")
    if family == "gguf":
        m.add_argument("--types", default=None, metavar="FILE",
                       help="a per-tensor type map (JSON; --bpw writes one beside the file) to replay or edit")


def budget_of(a: argparse.Namespace) -> Any:
    """The :class:`~lowbit.mixed.Budget` of the flags, or None (checked before any model loads)."""
    from lowbit.mixed import Budget, parse_budget

    if a.bpw is not None and a.max_size is not None:
        raise LowbitError("give --bpw or --max-size, not both")
    if a.bpw is not None:
        return Budget(bpw=a.bpw)
    if a.max_size is not None:
        b = parse_budget(a.max_size)
        if b.max_bytes is None:
            raise LowbitError(f"--max-size {a.max_size!r}: give a size such as 250MB or 1.2GB")
        return b
    if a.sensitivity or a.candidates:
        raise LowbitError("--sensitivity and --candidates go with --bpw or --max-size")
    return None


def allocate_args(a: argparse.Namespace, family: str, budget: Any, *, method: str = "rtn",
                  imatrix: str | None = None, calib: str | None = None, scale_bytes: int = 2) -> Any:
    """The :class:`~lowbit.mixed.Allocation` of ``budget`` for ``a.model`` (from ``--sensitivity`` or computed)."""
    from lowbit.mixed import plan
    from lowbit.mixed.candidates import parse_candidates

    cands = a.candidates.split(",") if a.candidates else None
    parse_candidates(cands, family)
    if a.sens_samples < 1 or a.sens_len < 2:
        raise LowbitError("--sens-samples must be >= 1 and --sens-len >= 2")
    return plan(a.model, budget, family, method=method, candidates=cands, sens=a.sensitivity, imatrix=imatrix,
                calib=calib, samples=a.sens_samples, length=a.sens_len, scale_bytes=scale_bytes,
                progress=not a.no_progress)


def read_types(path: str) -> dict[str, str]:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"cannot read the type map {path}: {e}") from e
    types = d.get("types", d) if isinstance(d, dict) else None
    if not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values()):
        raise LowbitError(f"{path}: expected a JSON object of tensor name -> GGUF type (or {{'types': {{...}}}})")
    return types


def print_choices(title: str, choice: dict[str, str]) -> None:
    """Every tensor's choice: one row per block (``blk.3`` / ``model.layers.3``), a column per tensor kind."""
    rows: dict[str, dict[str, str]] = {}
    kinds: list[str] = []
    for name, c in choice.items():
        m = re.match(r"^(.*?\.\d+)\.(.+?)(?:\.weight)?$", name)
        block, kind = (m.group(1), m.group(2)) if m else ("", name.removesuffix(".weight"))
        kind = kind.removeprefix("self_attn.").removeprefix("mlp.")
        rows.setdefault(block, {})[kind] = c
        if kind not in kinds:
            kinds.append(kind)
    body = [[b or "-", *(r.get(k, "") for k in kinds)] for b, r in rows.items()]
    console.print(table(title, ["block", *kinds], body))


def report_allocation(alloc: Any) -> None:
    counts = ", ".join(f"{k} x{v}" for k, v in alloc.counts().items())
    say(f"allocation under {alloc.budget.label}: {alloc.bits_per_weight:.3f} bits/weight as counted, predicted KLD "
        f"{alloc.predicted:.4g}; {counts}")
    print_choices("per-tensor choice", alloc.choice)
