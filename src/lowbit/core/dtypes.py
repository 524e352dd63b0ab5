"""Data-type schemes: weights mapped onto a fixed number format instead of an integer grid.

=========== ======================================================================================
NF4, FP4    block-wise absmax 4-bit (QLoRA, Dettmers et al. 2023): each block of ``block_size``
            consecutive weights (row-major, as bitsandbytes flattens them) is divided by its
            absolute maximum and rounded to the nearest of 16 code values; with ``double_quant``
            the fp32 absmax values are themselves quantized to 8 bits in blocks of 256.
INT8-LLM    LLM.int8 (Dettmers et al. 2022): int8 row-wise absmax weights; at run time the
            activations are int8 per token, except the input columns with outliers
            (``|x| >= threshold``), which are multiplied in 16-bit.
FP8         float8 E4M3 weights (max 448), one scale per output channel (or per
            ``block_size x block_size`` block); activations stay 16-bit (weight-only).
FP8_DYNAMIC FP8 weights per channel and float8 activations with one dynamic scale per token
            (W8A8, the compressed-tensors preset of the same name).
=========== ======================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lowbit.core.errors import SchemeError

DTYPES = ("nf4", "fp4", "int8", "fp8_e4m3")
ACTIVATIONS = (None, "int8-outlier", "fp8-token")
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class DataTypeScheme:
    """How the weights (and possibly activations) of a linear layer map onto a number format.

    Attributes:
        dtype: ``nf4``, ``fp4``, ``int8`` or ``fp8_e4m3``.
        block_size: absmax block of NF4/FP4 (one of 32..4096, default 64); for FP8 ``None`` is
            per output channel and ``N`` is square ``N x N`` blocks; unused for int8.
        double_quant: NF4/FP4 only: absmax values quantized to 8 bits in blocks of 256.
        activations: ``None`` (16-bit), ``int8-outlier`` (LLM.int8) or ``fp8-token`` (dynamic).
        threshold: LLM.int8 outlier threshold on activation magnitudes.
        name: the preset this came from.
    """

    dtype: str
    block_size: int | None = None
    double_quant: bool = False
    activations: str | None = None
    threshold: float = 6.0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SchemeError(f"unknown data type {self.dtype!r}; known: {', '.join(DTYPES)}")
        if self.activations not in ACTIVATIONS:
            raise SchemeError(f"unknown activation mode {self.activations!r}; known: {ACTIVATIONS[1:]} or None")
        bs = self.block_size
        if self.dtype in ("nf4", "fp4"):
            if bs not in BNB_BLOCK_SIZES:
                raise SchemeError(f"{self.dtype} block size must be one of {BNB_BLOCK_SIZES} (bitsandbytes), "
                                  f"got {bs!r}; pass --group-size 64 for the QLoRA default")
            if self.activations is not None:
                raise SchemeError(f"{self.dtype} is weight-only; activations stay 16-bit")
        else:
            if self.double_quant:
                raise SchemeError("double quantization applies to NF4/FP4 absmax values only")
            if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0):
                raise SchemeError(f"block size must be a positive integer or None (per-channel), got {bs!r}")
        if self.dtype == "int8":
            if bs is not None:
                raise SchemeError("LLM.int8 weights are row-wise (one scale per output channel); drop --group-size")
            if self.activations != "int8-outlier":
                raise SchemeError("the int8 data type is LLM.int8: activations must be 'int8-outlier'")
            if not self.threshold > 0:
                raise SchemeError(f"LLM.int8 outlier threshold must be > 0, got {self.threshold}")
        if self.dtype == "fp8_e4m3" and self.activations not in (None, "fp8-token"):
            raise SchemeError("FP8 activations are 16-bit (FP8) or dynamic per-token float8 (FP8_DYNAMIC)")

    @property
    def bits(self) -> int:
        return 4 if self.dtype in ("nf4", "fp4") else 8

    @property
    def label(self) -> str:
        if self.dtype in ("nf4", "fp4"):
            return f"{self.dtype.upper()} b{self.block_size}{' +DQ' if self.double_quant else ''}"
        if self.dtype == "int8":
            return f"LLM.int8 t{self.threshold:g}"
        g = "per-channel" if self.block_size is None else f"block {self.block_size}x{self.block_size}"
        return f"FP8 E4M3 {g} {'W8A8 dynamic' if self.activations else 'weight-only'}"

    def check_input(self, in_features: int) -> None:
        """Every input dimension takes a data type (blocks run over the flattened weight, or per channel)."""

    def bits_per_weight(self, in_features: int, out_features: int = 1) -> float:
        """Storage bits per weight, scales included (LLM.int8 outlier columns not counted)."""
        if self.dtype in ("nf4", "fp4"):
            bs = self.block_size or 64
            return 4 + (8 + 32 / 256 if self.double_quant else 32) / bs
        if self.dtype == "int8":
            return 8 + 32 / in_features
        if self.block_size is None:
            return 8 + 32 / in_features
        return 8 + 32 / self.block_size**2

    def with_options(self, **changes: Any) -> DataTypeScheme:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "datatype", "dtype": self.dtype, "block_size": self.block_size,
                "double_quant": self.double_quant, "activations": self.activations,
                "threshold": self.threshold, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataTypeScheme:
        known = {"kind", "dtype", "block_size", "double_quant", "activations", "threshold", "name"}
        unknown = set(d) - known
        if unknown:
            raise SchemeError(f"unknown data-type scheme fields {sorted(unknown)}")
        return cls(d["dtype"], d.get("block_size"), bool(d.get("double_quant", False)), d.get("activations"),
                   float(d.get("threshold", 6.0)), d.get("name"))


DT_PRESETS: dict[str, DataTypeScheme] = {
    "NF4": DataTypeScheme("nf4", 64, name="NF4"),
    "FP4": DataTypeScheme("fp4", 64, name="FP4"),
    "INT8-LLM": DataTypeScheme("int8", None, activations="int8-outlier", name="INT8-LLM"),
    "FP8": DataTypeScheme("fp8_e4m3", None, name="FP8"),
    "FP8_DYNAMIC": DataTypeScheme("fp8_e4m3", None, activations="fp8-token", name="FP8_DYNAMIC"),
}

_UNSET: Any = object()


def is_datatype_scheme(name: str) -> bool:
    return name.strip().upper() in DT_PRESETS


def get_dt_scheme(name: str, block_size: int | None = _UNSET, double_quant: bool | None = None,
                  threshold: float | None = None) -> DataTypeScheme:
    """Look up a data-type preset (case-insensitive); ``block_size`` -1/0 means per-channel (FP8)."""
    key = name.strip().upper()
    if key not in DT_PRESETS:
        raise SchemeError(f"unknown data-type scheme {name!r}; known: {', '.join(DT_PRESETS)}")
    changes: dict[str, Any] = {}
    if block_size is not _UNSET:
        changes["block_size"] = None if block_size is None or block_size in (-1, 0) else block_size
    if double_quant is not None:
        changes["double_quant"] = double_quant
    if threshold is not None:
        changes["threshold"] = threshold
    return DT_PRESETS[key].with_options(**changes) if changes else DT_PRESETS[key]
