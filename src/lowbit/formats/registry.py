"""The format registry: format name -> save / load / detect. Adding a format touches this folder only.

=========================== =================================== ====================================
format                      holds                               loaded by
=========================== =================================== ====================================
``compressed-tensors``      integer weights (W8A16, W4A16 ...),  vLLM, transformers (+ compressed-tensors),
                            ``pack-quantized``, mixed schemes    lowbit
``compressed-tensors-fp8``  FP8 E4M3 weights (+ dynamic acts)   vLLM, transformers, lowbit
``compressed-tensors-w8a8`` int8 weights and activations        vLLM, transformers, lowbit
``bitsandbytes``            NF4, FP4, LLM.int8                  transformers + bitsandbytes, lowbit
``awq``                     AutoAWQ's 4-bit GEMM layout         vLLM, transformers (+ autoawq/gptqmodel),
                                                                lowbit
=========================== =================================== ====================================
GGUF files are written by :mod:`lowbit.formats.gguf` (``lowbit gguf``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import FormatError
from lowbit.formats import awq_gemm, bitsandbytes, compressed_tensors, ct_float, ct_int8


@dataclass
class SaveRequest:
    """Everything a format's writer may use. ``record`` is the provenance record (``provenance.json``),
    ``files`` more text files (``recipe.yaml``); ``actorder`` and ``input_scales`` are what the method
    reported (GPTQ's act-order, SmoothQuant's static activation scales)."""

    model: nn.Module
    weights: dict[str, Any]
    out: Path
    scheme: Any
    dtype: torch.dtype
    tokenizer: Any = None
    overwrite: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    actorder: str | None = None
    input_scales: dict[str, float] | None = None


@dataclass(frozen=True)
class ArtifactFormat:
    name: str
    detect: Callable[[dict[str, Any]], bool]
    load: Callable[[Path, torch.dtype], nn.Module]
    save: Callable[[SaveRequest], Path]
    engines: str


def _save_ct(r: SaveRequest) -> Path:
    return compressed_tensors.save_quantized(r.model, r.weights, r.out, tokenizer=r.tokenizer, recipe=r.record,
                                             dtype=r.dtype, overwrite=r.overwrite, actorder=r.actorder,
                                             files=r.files)


def _save_fp8(r: SaveRequest) -> Path:
    return ct_float.save_fp8(r.model, r.weights, r.out, scheme=r.scheme, tokenizer=r.tokenizer, recipe=r.record,
                             dtype=r.dtype, overwrite=r.overwrite, files=r.files)


def _save_w8a8(r: SaveRequest) -> Path:
    return ct_int8.save_w8a8(r.model, r.weights, r.out, scheme=r.scheme, tokenizer=r.tokenizer, recipe=r.record,
                             dtype=r.dtype, overwrite=r.overwrite, input_scales=r.input_scales, files=r.files)


def _save_bnb(r: SaveRequest) -> Path:
    return bitsandbytes.save_bnb(r.model, r.weights, r.out, scheme=r.scheme, tokenizer=r.tokenizer,
                                 recipe=r.record, dtype=r.dtype, overwrite=r.overwrite, files=r.files)


def _save_awq(r: SaveRequest) -> Path:
    return awq_gemm.save_awq_gemm(r.model, r.weights, r.out, tokenizer=r.tokenizer, recipe=r.record,
                                  overwrite=r.overwrite, files=r.files)


def _is_pack(config: dict[str, Any]) -> bool:
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" and qc.get("format") == compressed_tensors.CT_FORMAT


# detection order matters: the W8A8 and FP8 checks are narrower than pack-quantized's
FORMATS: dict[str, ArtifactFormat] = {f.name: f for f in (
    ArtifactFormat("compressed-tensors-w8a8", ct_int8.is_w8a8_artifact,
                   lambda p, d: ct_int8.load_w8a8(p, dtype=d)[0], _save_w8a8, "vLLM, transformers"),
    ArtifactFormat("compressed-tensors-fp8", ct_float.is_fp8_artifact,
                   lambda p, d: ct_float.load_fp8(p, dtype=d)[0], _save_fp8, "vLLM, transformers"),
    ArtifactFormat("compressed-tensors", _is_pack,
                   lambda p, d: compressed_tensors.load_quantized(p, dtype=d)[0], _save_ct, "vLLM, transformers"),
    ArtifactFormat("bitsandbytes", bitsandbytes.is_bnb_artifact,
                   lambda p, d: bitsandbytes.load_bnb(p, dtype=d)[0], _save_bnb, "transformers + bitsandbytes"),
    ArtifactFormat("awq", awq_gemm.is_awq_artifact,
                   lambda p, d: awq_gemm.load_awq_gemm(p, dtype=d)[0], _save_awq,
                   "vLLM, transformers (+ gptqmodel)"),
)}


def format_for(scheme: Any, requested: str = "auto") -> ArtifactFormat:
    """The format that writes ``scheme`` (``requested``: ``auto`` or a format name); refuses a mismatch."""
    if isinstance(scheme, DataTypeScheme):
        natural = "compressed-tensors-fp8" if scheme.dtype == "fp8_e4m3" else "bitsandbytes"
    elif scheme.act_bits:
        natural = "compressed-tensors-w8a8"
    else:
        natural = "compressed-tensors"
    if requested in ("auto", natural) or (requested == "compressed-tensors" and natural.startswith(requested)):
        return FORMATS[natural]
    if requested == "awq":
        if isinstance(scheme, DataTypeScheme) or scheme.bits != 4 or scheme.group_size is None or scheme.act_bits:
            raise FormatError(f"the awq format holds 4-bit grouped weights (e.g. W4A16_ASYM), not {scheme.label}")
        return FORMATS["awq"]
    raise FormatError(f"{scheme.label} is written as {natural}, not {requested}; use format auto")


def read_config_dict(path: str | Path) -> dict[str, Any] | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{cfg} is not valid JSON ({e}); re-export the model") from e
    return data if isinstance(data, dict) else None


def detect(path: str | Path) -> ArtifactFormat | None:
    """The format of a lowbit (or compatible) artifact folder, or None for anything else."""
    config = read_config_dict(path)
    if config is None or not config.get("quantization_config"):
        return None
    for f in FORMATS.values():
        if f.detect(config):
            return f
    return None


def load_artifact(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An artifact folder of any registered format, with lowbit's runtime modules."""
    f = detect(path)
    if f is None:
        raise FormatError(f"{path} is not a quantized artifact lowbit reads (formats: {', '.join(FORMATS)})")
    return f.load(Path(path), dtype)
