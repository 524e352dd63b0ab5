"""Choosing one configuration under a user's limits, with reasons in plain words.

Rows are plain dicts (a compare report's rows): ``size_bytes``, ``ppl_increase_pct`` (perplexity over the
reference's, in percent), ``kld``, ``decode_tokens_per_s``, ``peak_memory_bytes``. The rule:

- a row is *feasible* when it meets every limit given (``max_size``, ``max_memory`` in bytes,
  ``max_ppl_increase`` in percent, ``min_decode_tps``); the reference itself is never recommended;
- with a quality limit (``max_ppl_increase``), the smallest feasible row wins (lower KLD breaks ties): the
  user said how much quality they give up, so spend it on size; without one, the feasible row with the
  lowest KLD wins (smaller size breaks ties); with no limit at all, ``max_ppl_increase`` is
  :data:`DEFAULT_PPL_INCREASE` percent;
- the runner-up is the next row by the same rule; when nothing is feasible, the report names the closest
  row (smallest sum of relative shortfalls) and the limit that binds: the one that row misses (its worst
  miss when it misses several).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_PPL_INCREASE = 5.0
GB = 1e9


@dataclass(frozen=True)
class Limits:
    max_size: float | None = None  # bytes
    max_memory: float | None = None  # bytes
    max_ppl_increase: float | None = None  # percent
    min_decode_tps: float | None = None

    def effective(self) -> Limits:
        if all(v is None for v in asdict(self).values()):
            return Limits(max_ppl_increase=DEFAULT_PPL_INCREASE)
        return self

    def describe(self) -> str:
        parts = []
        if self.max_size is not None:
            parts.append(f"size <= {self.max_size / GB:.3g} GB")
        if self.max_memory is not None:
            parts.append(f"peak memory <= {self.max_memory / GB:.3g} GB")
        if self.max_ppl_increase is not None:
            parts.append(f"perplexity within +{self.max_ppl_increase:g}%")
        if self.min_decode_tps is not None:
            parts.append(f"decode >= {self.min_decode_tps:g} tokens/s")
        return ", ".join(parts) or "none"


# (limit field, row field, direction): +1 means the row's value must not exceed the limit
_CHECKS = (("max_size", "size_bytes", 1), ("max_memory", "peak_memory_bytes", 1),
           ("max_ppl_increase", "ppl_increase_pct", 1), ("min_decode_tps", "decode_tokens_per_s", -1))
_FLAGS = {"max_size": "--max-size", "max_memory": "--max-memory", "max_ppl_increase": "--max-ppl-increase",
          "min_decode_tps": "--min-decode-tps"}


def human_size(n: float) -> str:
    """``1.23 GB`` / ``456 MB`` / ``78 kB``."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def shortfalls(row: dict[str, Any], limits: Limits) -> dict[str, float]:
    """Each limit the row misses, by its relative shortfall (0.2: 20% past the limit); a value the row lacks
    counts as missed."""
    out = {}
    for lim, field, sign in _CHECKS:
        bound = getattr(limits, lim)
        if bound is None:
            continue
        v = row.get(field)
        if v is None:
            out[lim] = float("inf")
        elif sign * (v - bound) > 0:
            out[lim] = abs(v - bound) / max(abs(bound), 1e-12)
    return out


def pareto(rows: list[dict[str, Any]], x: str = "size_bytes", y: str = "kld") -> list[str]:
    """Names of the rows no other row beats on both ``x`` and ``y`` (lower is better on both)."""
    pts = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    front = []
    for r in pts:
        if not any(o is not r and o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in pts):
            front.append(r["name"])
    return front


def _rank(rows: list[dict[str, Any]], limits: Limits) -> list[dict[str, Any]]:
    inf = float("inf")
    if limits.max_ppl_increase is not None:
        return sorted(rows, key=lambda r: (r["size_bytes"], r.get("kld") if r.get("kld") is not None else inf))
    return sorted(rows, key=lambda r: (r.get("kld") if r.get("kld") is not None else inf, r["size_bytes"]))


def _reason(row: dict[str, Any], ref: dict[str, Any] | None, limits: Limits, first: bool) -> str:
    what = "smallest that keeps" if limits.max_ppl_increase is not None else "lowest KL divergence that keeps"
    bits = [f"{what} {limits.describe()}" if first else f"next by the same rule ({limits.describe()})"]
    bits.append(f"{human_size(row['size_bytes'])}, {row.get('bits_per_weight', 0):.2f} bits/weight")
    if row.get("ppl_increase_pct") is not None:
        bits.append(f"perplexity {row['ppl_increase_pct']:+.2f}%, KLD {row['kld']:.4f}")
    ref_tps = None if ref is None else ref.get("decode_tokens_per_s")
    if row.get("decode_tokens_per_s") and ref_tps:
        engine = f" ({row['engine']}{', dequantized' if row.get('dequantized') else ''})" if row.get("engine") else ""
        bits.append(f"{row['decode_tokens_per_s'] / ref_tps:.2f}x the reference's decode speed{engine}")
    return "; ".join(bits)


def recommend(rows: list[dict[str, Any]], limits: Limits) -> dict[str, Any]:
    """``{"name", "reasons", "runner_up": {...} | None, "limits", "binding": ... | None}``."""
    lim = limits.effective()
    ref = next((r for r in rows if r["name"] == "reference"), None)
    cands = [r for r in rows if r["name"] != "reference"]
    feasible = [r for r in cands if not shortfalls(r, lim)]
    out: dict[str, Any] = {"limits": asdict(lim), "limits_text": lim.describe(), "default_limit": lim != limits}
    if feasible:
        ranked = _rank(feasible, lim)
        out.update(name=ranked[0]["name"], reasons=_reason(ranked[0], ref, lim, True), binding=None)
        out["runner_up"] = ({"name": ranked[1]["name"], "reasons": _reason(ranked[1], ref, lim, False)}
                            if len(ranked) > 1 else None)
        return out
    if not cands:
        out.update(name=None, reasons="no configuration besides the reference was measured", binding=None,
                   runner_up=None)
        return out
    misses = {r["name"]: shortfalls(r, lim) for r in cands}
    closest = min(cands, key=lambda r: sum(min(v, 1e6) for v in misses[r["name"]].values()))
    miss = misses[closest["name"]]
    binding = max(miss, key=lambda k: miss[k])  # what keeps the closest row out (its only miss, or its worst)
    out.update(name=None, binding=binding, runner_up=None, closest=closest["name"],
               reasons=(f"nothing satisfies {lim.describe()}: {_FLAGS[binding]} binds. Closest: {closest['name']} "
                        f"(misses {', '.join(f'{_FLAGS[k]} by {v:.0%}' for k, v in miss.items())}); "
                        + _reason(closest, ref, lim, True).split('; ', 1)[-1]))
    return out
