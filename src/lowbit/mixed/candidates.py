"""What a tensor may become under a bit budget, and what each choice costs in bytes on disk.

Two families, one per artifact kind:

- ``int`` (compressed-tensors ``pack-quantized``): an integer :class:`~lowbit.core.scheme.QuantScheme`.
  Bytes of a linear ``W (out, in)`` with ``b`` bits and ``G`` groups, as the writer stores them
  (:mod:`lowbit.formats.compressed_tensors`)::

      weight_packed      4 * out * ceil(in * b / 32)          int32, dense packing along ``in``
      weight_scale       s * out * G                          s = 2 (bf16/fp16) or 4 (fp32)
      weight_zero_point  4 * ceil(out * b / 32) * G           asymmetric only
      weight_shape       2 * 8                                int64 [out, in]

- ``gguf`` (llama.cpp): a GGML tensor type. Bytes of ``rows x cols``: ``rows * cols / block * type_size``
  (``gguf.GGML_QUANT_SIZES``, e.g. Q4_K: 256 values in ``2 + 2 + 12 + 128 = 144`` bytes). A type fits only
  where its block divides the row length (K-quants need rows of a multiple of 256: Gemma-3-270M's 640-wide
  and Qwen2.5-0.5B's 896-wide inputs take the 32-value legacy types only).

Names on the command line: ``W4`` (4 bits, group 128, symmetric), ``W4g32``, ``W3g64a`` (asymmetric), ``W8c``
(per channel), or a preset (``W4A16``, ``W8A16``); GGUF types by their name (``Q4_K``, ``Q5_0``, ``Q8_0``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.core.errors import LowbitError
from lowbit.core.packing import packed_words
from lowbit.core.presets import PRESET_NAMES
from lowbit.core.scheme import PRESETS, QuantScheme

Q = GGMLQuantizationType
FAMILIES = ("int", "gguf")
_INT_NAME = re.compile(r"^[wW]([2-8])(?:g(\d+)|(c))?(a)?$")
#: GGUF types lowbit's encoder writes byte-identical to llama.cpp (lowbit.formats.gguf.encode)
GGUF_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16")

DEFAULT_INT = ("W2g64", "W3g128", "W3g32", "W4g128", "W4g64", "W4g32", "W8c")
DEFAULT_GGUF = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@dataclass(frozen=True)
class Candidate:
    """One storage choice for a tensor: ``scheme`` (int family) or ``gguf`` type (gguf family)."""

    name: str
    scheme: QuantScheme | None = None
    gguf: Q | None = None

    @property
    def family(self) -> str:
        return "int" if self.scheme is not None else "gguf"

    def fits(self, shape: tuple[int, int]) -> bool:
        """Whether a ``(rows, cols)`` weight can be stored so: the group / block divides ``cols``."""
        cols = shape[1]
        if self.scheme is not None:
            return self.scheme.group_size is None or cols % self.scheme.group_size == 0
        assert self.gguf is not None
        return cols % GGML_QUANT_SIZES[self.gguf][0] == 0

    def nbytes(self, shape: tuple[int, int], scale_bytes: int = 2) -> int:
        """Bytes the file holds for a ``(rows, cols)`` weight (see the module docstring)."""
        rows, cols = shape
        if not self.fits(shape):
            raise LowbitError(f"{self.name} cannot store a {rows}x{cols} weight: its group/block does not divide "
                              f"{cols}")
        if self.gguf is not None:
            block, size = GGML_QUANT_SIZES[self.gguf]
            return rows * (cols // block) * size
        s = self.scheme
        assert s is not None
        groups = s.n_groups(cols)
        n = 4 * rows * packed_words(cols, s.bits) + scale_bytes * rows * groups + 16
        if not s.symmetric:
            n += 4 * math.ceil(rows * s.bits / 32) * groups
        return n

    def bits_per_weight(self, shape: tuple[int, int], scale_bytes: int = 2) -> float:
        return 8 * self.nbytes(shape, scale_bytes) / (shape[0] * shape[1])


def int_name(s: QuantScheme) -> str:
    """The short name of an integer scheme: ``W4g128``, ``W3g64a``, ``W8c``."""
    return f"W{s.bits}{'c' if s.group_size is None else f'g{s.group_size}'}{'' if s.symmetric else 'a'}"


def int_candidate(s: QuantScheme) -> Candidate:
    s = s.with_options(name=None)
    return Candidate(int_name(s), scheme=s)


def parse_candidate(text: str, family: str | None = None) -> Candidate:
    """A candidate from its name (see the module docstring); ``family`` restricts the accepted kind."""
    t = text.strip()
    if t.upper() in GGUF_TYPES and family != "int":
        return Candidate(t.upper(), gguf=Q.__members__[t.upper()])
    if family != "gguf":
        m = _INT_NAME.match(t)
        if m:
            bits, group, chan, asym = m.groups()
            gs = None if chan else int(group) if group else 128
            return int_candidate(QuantScheme(int(bits), gs, not asym))
        if t.upper() in PRESETS and PRESETS[t.upper()].act_bits is None:
            return int_candidate(PRESETS[t.upper()])
    kinds = {"int": "integer schemes like W4, W4g32, W3g64a, W8c or a preset (W4A16)",
             "gguf": f"GGUF types ({', '.join(GGUF_TYPES)})"}
    want = kinds[family] if family else " or ".join(kinds.values())
    hint = " (data-type schemes such as NF4 and W8A8 do not mix per layer)" if t.upper() in PRESET_NAMES else ""
    raise LowbitError(f"unknown candidate {text!r}{hint}; use {want}")


def parse_candidates(spec: str | list[str] | tuple[str, ...] | None, family: str) -> list[Candidate]:
    """Candidates from a comma-separated list (or None: the family's defaults), in a fixed order: by bits per
    weight of a 4096-wide row, then by name (the allocation's tie-break is this order)."""
    if family not in FAMILIES:
        raise LowbitError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if spec is None:
        names: list[str] = list(DEFAULT_INT if family == "int" else DEFAULT_GGUF)
    elif isinstance(spec, str):
        names = [s for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    if not names:
        raise LowbitError("no candidates given")
    cands = list(dict.fromkeys(parse_candidate(n, family) for n in names))
    return sorted(cands, key=lambda c: (c.bits_per_weight((4096, 4096)), c.name))
