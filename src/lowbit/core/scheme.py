"""Quantization schemes: frozen, validated dataclasses, named as llm-compressor names them.

A scheme says how one weight matrix ``W (out, in)`` is mapped to integer codes::

    groups:  column j of W belongs to group g(j) = j // group_size   (per-channel: one group)
    codes:   q = clamp(round(w / s) + z, 0, 2^bits - 1)                  unsigned integers
    weights: w_hat = s * (q - z)                                         s (out, n_groups), z likewise

Symmetric schemes fix the integer zero point at ``z = 2^(bits-1)`` (the compressed-tensors and
GPTQ convention: the signed code ``q - z`` lies in ``[-2^(bits-1), 2^(bits-1) - 1]``);
asymmetric schemes store one integer ``z`` in ``[0, 2^bits - 1]`` per group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lowbit.core.errors import SchemeError

SCHEME_VERSION = 1


ACT_STRATEGIES = ("token", "tensor")


@dataclass(frozen=True)
class QuantScheme:
    """How the weights (and, for W8A8, the activations) of a linear layer are quantized.

    Attributes:
        bits: weight bits, 2..8.
        group_size: input columns sharing one scale; ``None`` means per output channel.
        symmetric: integer zero point fixed at ``2^(bits-1)`` when True, one per group when False.
        name: the preset name this scheme came from (informational).
        act_bits: ``None`` (activations stay 16-bit, ``A16``) or 8: symmetric int8 activations,
            ``q = clamp(round(x / s_x), -127, 127)``.
        act_strategy: ``token`` (one dynamic scale per token, ``s_x = max_j |x_j| / 127``) or
            ``tensor`` (one static scale per layer, calibrated).
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = True
    name: str | None = None
    act_bits: int | None = None
    act_strategy: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise SchemeError(f"weight bits must be an integer from 2 to 8, got {self.bits!r}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
            raise SchemeError(
                f"group size must be a positive integer or None (per-channel), got {gs!r}; "
                "use --group-size -1 (or 0) on the command line for per-channel"
            )
        if not isinstance(self.symmetric, bool):
            raise SchemeError(f"symmetric must be True or False, got {self.symmetric!r}")
        if self.act_bits is not None:
            if self.act_bits != 8:
                raise SchemeError(f"activation bits must be 8 (int8) or None (16-bit), got {self.act_bits!r}")
            if self.act_strategy not in ACT_STRATEGIES:
                raise SchemeError(f"activation strategy must be one of {ACT_STRATEGIES}, got {self.act_strategy!r}")
            if self.bits != 8 or self.group_size is not None or not self.symmetric:
                raise SchemeError("int8 activations go with int8 symmetric per-channel weights (W8A8); "
                                  "use --scheme W8A8 without --group-size")
        elif self.act_strategy is not None:
            raise SchemeError("act_strategy needs act_bits=8")

    @property
    def qmax(self) -> int:
        """Largest unsigned code, ``2^bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The fixed zero point of symmetric schemes, ``2^(bits-1)``."""
        return 1 << (self.bits - 1)

    @property
    def strategy(self) -> str:
        """compressed-tensors strategy name: ``group`` or ``channel``."""
        return "channel" if self.group_size is None else "group"

    @property
    def label(self) -> str:
        """Short human label, e.g. ``W4A16 g128 sym``."""
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        if self.act_bits:
            acts = "dynamic per-token" if self.act_strategy == "token" else "static per-tensor"
            return f"W{self.bits}A{self.act_bits} {g} sym, {acts} int8 activations"
        return f"W{self.bits}A16 {g} {'sym' if self.symmetric else 'asym'}"

    def n_groups(self, in_features: int) -> int:
        """Number of groups along the input dimension; raises when the group size does not divide it."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise SchemeError(
                f"group size {self.group_size} does not divide the input dimension {in_features}; "
                f"pick a divisor of {in_features} (e.g. {_divisors_hint(in_features)}) or per-channel (-1)"
            )
        return in_features // self.group_size

    def check_input(self, in_features: int) -> None:
        """Raise :class:`SchemeError` unless a linear with ``in_features`` inputs can take this scheme."""
        self.n_groups(in_features)

    def bits_per_weight(self, in_features: int, scale_bits: int = 16) -> float:
        """Storage bits per weight: codes plus one scale (and zero point when asymmetric) per group."""
        group = in_features if self.group_size is None else self.group_size
        extra = scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + extra / group

    def with_options(self, **changes: Any) -> QuantScheme:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEME_VERSION,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "name": self.name,
            **({"act_bits": self.act_bits, "act_strategy": self.act_strategy} if self.act_bits else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        known = {"version", "bits", "group_size", "symmetric", "name", "act_bits", "act_strategy"}
        unknown = set(d) - known
        if unknown:
            raise SchemeError(f"unknown scheme fields {sorted(unknown)}; known fields: {sorted(known)}")
        if d.get("version", SCHEME_VERSION) > SCHEME_VERSION:
            raise SchemeError(f"scheme version {d['version']} is newer than this lowbit; upgrade lowbit")
        return cls(bits=d["bits"], group_size=d.get("group_size"), symmetric=d.get("symmetric", True),
                   name=d.get("name"), act_bits=d.get("act_bits"), act_strategy=d.get("act_strategy"))


def _divisors_hint(n: int) -> str:
    ds = [g for g in (32, 64, 128, 256) if n % g == 0]
    return ", ".join(str(g) for g in ds) if ds else "none of 32/64/128/256 divide it"


# Presets, named as llm-compressor names them (W8A16 is per-channel there; W4A16 is group 128).
PRESETS: dict[str, QuantScheme] = {
    "W8A16": QuantScheme(8, None, True, "W8A16"),
    "W8A16_ASYM": QuantScheme(8, None, False, "W8A16_ASYM"),
    "W4A16": QuantScheme(4, 128, True, "W4A16"),
    "W4A16_ASYM": QuantScheme(4, 128, False, "W4A16_ASYM"),
    "W3A16": QuantScheme(3, 128, True, "W3A16"),
    "W3A16_ASYM": QuantScheme(3, 128, False, "W3A16_ASYM"),
    "W2A16": QuantScheme(2, 64, True, "W2A16"),
    "W2A16_ASYM": QuantScheme(2, 64, False, "W2A16_ASYM"),
    # int8 weights per channel and int8 activations: dynamic per token (llm-compressor's W8A8) or static
    "W8A8": QuantScheme(8, None, True, "W8A8", act_bits=8, act_strategy="token"),
    "W8A8_STATIC": QuantScheme(8, None, True, "W8A8_STATIC", act_bits=8, act_strategy="tensor"),
}

_UNSET: Any = object()


def get_scheme(name: str, group_size: int | None = _UNSET, symmetric: bool | None = None) -> QuantScheme:
    """Look up a preset by name (case-insensitive) and optionally override its group size / symmetry.

    ``group_size`` of ``-1`` or ``0`` means per-channel (the GPTQ and llm-compressor convention).
    """
    key = name.strip().upper()
    if key not in PRESETS:
        raise SchemeError(f"unknown scheme {name!r}; known schemes: {', '.join(PRESETS)}")
    scheme = PRESETS[key]
    changes: dict[str, Any] = {}
    if group_size is not _UNSET:
        changes["group_size"] = None if group_size is None or group_size in (-1, 0) else group_size
    if symmetric is not None:
        changes["symmetric"] = symmetric
    return scheme.with_options(**changes) if changes else scheme
