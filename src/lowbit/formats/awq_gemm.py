"""AutoAWQ "GEMM" checkpoints: the layout engines that read ``quant_method: awq`` load.

A Hugging Face folder (see :mod:`lowbit.formats.hf_folder`) whose ``config.json`` carries::

    "quantization_config": {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": G,
                            "zero_point": true, "modules_to_not_convert": [linears left dense] or null}

Per quantized linear ``L`` (``W (out, in)``, ``G`` columns a group, ``n = in / G`` groups)::

    L.qweight  (in, out/8)  int32    codes, transposed (row = input column), 8 a word along out
    L.qzeros   (n,  out/8)  int32    integer zero points, stored as they are (not minus one), same packing
    L.scales   (n,  out)    float16
    L.bias     (out,)       float16  when the linear has one

    W_hat[r, j] = scales[j // G, r] * (code[j, r] - zero[j // G, r])     (the engines compute it in fp16)

Nibble order: the 8 codes of output columns ``8k .. 8k+7`` go to word ``k`` interleaved,
nibble ``i`` (bits ``4i .. 4i+3``, least significant first) holding column ``8k + AWQ_ORDER[i]``
with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (AutoAWQ's ``WQLinear_GEMM.from_linear`` and GPTQModel's
``pack_awq``; unpacked with ``AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]``).

Only 4-bit, grouped weights without ``g_idx`` fit this layout. Symmetric 4-bit is written too: its
zero point is 8 everywhere (lowbit's ``sym_zero``), stored in ``qzeros`` with ``zero_point: true``,
which every AWQ engine reads exactly; lowbit's loader reports it symmetric again when the recipe
says so and every zero is 8.

Scales are fp16 in this layout. lowbit keeps bf16 scales by default: every bf16 value in fp16's
normal range (6.1e-5 .. 65504) is exact in fp16, so the round trip is exact for real models;
scales that fp16 cannot hold exactly (tiny, subnormal) are rounded and a warning is logged, and
scales that overflow fp16 are refused. Quantize with ``scale_dtype=torch.float16`` to be exact by
construction. The folder always encodes exactly what lowbit's loader rebuilds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import FormatError
from lowbit.core.qlinear import QuantLinear
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.formats.hf_folder import (
    check_linears,
    empty_model,
    finish_load,
    model_tensors,
    read_config,
    read_record,
    read_tensors,
    replace_module,
    write_hf_folder,
)

log = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
BITS = 4
PACK = 32 // BITS  # codes a word
FIX = "quantize with --scheme W4A16_ASYM (or W4A16) and a group size such as 128"
__all__ = ["AWQ_ORDER", "fp16_scales", "is_awq_artifact", "load_awq_gemm", "pack_awq", "quantization_config",
           "save_awq_gemm", "unpack_awq"]


def _check(qw: QuantizedWeight, name: str = "weight") -> None:
    s = qw.scheme
    if s.bits != BITS:
        raise FormatError(f"{name}: the AWQ GEMM layout holds 4-bit weights only, got {s.bits}-bit; {FIX}")
    if s.group_size is None:
        raise FormatError(f"{name}: the AWQ GEMM layout needs grouped scales, got per-channel; {FIX}")
    if qw.g_idx is not None:
        raise FormatError(f"{name}: the AWQ GEMM layout has no g_idx (act-order with dynamic groups); "
                          "quantize without --dynamic-groups (static groups are fine)")
    if qw.shape[0] % PACK:
        raise FormatError(f"{name}: {qw.shape[0]} output features are not a multiple of {PACK}, which AWQ "
                          "packing needs; leave this layer unquantized")


def _pack_cols(x: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)`` 4-bit values -> ``(rows, cols/8)`` int32, AWQ interleave along cols."""
    rows, cols = x.shape
    v = x.to(torch.int64).view(rows, cols // PACK, PACK)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=x.device)
    words = (v << shifts).sum(-1)  # nibbles do not overlap: the sum is a bitwise or, in [0, 2^32)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def _unpack_cols(w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_cols`: ``(rows, words)`` int32 -> ``(rows, 8*words)`` uint8."""
    if w.dtype != torch.int32 or w.ndim != 2:
        raise ValueError(f"packed AWQ tensor must be 2-D int32, got {w.dtype} {tuple(w.shape)}")
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=w.device)
    nib = ((w.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 0xF
    return nib[..., list(AWQ_REVERSE_ORDER)].reshape(w.shape[0], -1).to(torch.uint8)


def fp16_scales(scales: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """``scales`` as fp16; refuses overflow, warns when some value is rounded."""
    s16 = scales.to(torch.float16)
    if not torch.isfinite(s16).all():
        raise FormatError(f"{name}: scales exceed fp16's range (max {float(scales.abs().max()):.4g} > 65504), "
                          "which the AWQ layout stores; use the compressed-tensors format instead")
    changed = s16.to(scales.dtype) != scales
    if bool(changed.any()):
        rel = ((s16.float() - scales.float()).abs() / scales.float().abs().clamp_min(1e-30)).max()
        log.warning("%s: %d scale(s) are not exact in fp16 (max relative change %.3g); the AWQ folder stores "
                    "them rounded (quantize with scale_dtype=torch.float16 to avoid this)",
                    name, int(changed.sum()), float(rel))
    return s16


def pack_awq(qw: QuantizedWeight, name: str = "weight") -> dict[str, torch.Tensor]:
    """``{"qweight", "qzeros", "scales"}`` of one linear in the AWQ GEMM layout (module docstring)."""
    _check(qw, name)
    return {"qweight": _pack_cols(qw.codes.t()), "qzeros": _pack_cols(qw.zeros.t()),
            "scales": fp16_scales(qw.scales, name).t().contiguous()}


def unpack_awq(t: Mapping[str, torch.Tensor], group_size: int = 0, symmetric: bool = False,
               name: str = "weight") -> QuantizedWeight:
    """Inverse of :func:`pack_awq` (codes and zeros bit for bit; scales as stored, fp16).

    ``t`` maps ``qweight``, ``qzeros`` and ``scales`` to the layer's tensors. ``group_size``: 0 takes
    ``in / n_groups`` from the shapes, -1 means per-channel (one group), any other value is checked
    against the shapes. ``symmetric`` claims a symmetric scheme; it holds only if every zero is 8.
    """
    try:
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
        inp, words = qweight.shape
        groups, out = scales.shape
        if out != words * PACK or qzeros.shape != (groups, words) or groups == 0 or inp % groups:
            raise ValueError(f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                             f"{tuple(scales.shape)} do not agree")
        gs: int | None = None if group_size == -1 else inp // groups
        if (group_size == -1 and groups != 1) or group_size not in (0, -1, gs):
            raise ValueError(f"{groups} groups of {inp} input columns do not match group size {group_size}")
        zeros = _unpack_cols(qzeros).t().contiguous()
        sym = symmetric and bool((zeros == 1 << (BITS - 1)).all())
        return QuantizedWeight(_unpack_cols(qweight).t().contiguous(), scales.t().contiguous(), zeros,
                               QuantScheme(BITS, gs, sym))
    except (KeyError, ValueError) as e:
        raise FormatError(f"{name}: AWQ tensors are missing or inconsistent ({e}); the checkpoint is corrupt "
                          "or not in the AWQ GEMM layout") from e


def quantization_config(group_size: int, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json, as AutoAWQ writes it (transformers' AwqConfig reads it)."""
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": BITS,
            "version": "gemm", "modules_to_not_convert": ignore or None}


def save_awq_gemm(model: nn.Module, qweights: dict[str, QuantizedWeight], out_dir: str | Path, *,
                  tokenizer: Any = None, recipe: dict[str, Any] | None = None,
                  dtype: torch.dtype = torch.float16, overwrite: bool = False,
                  files: dict[str, str] | None = None) -> Path:
    """Write ``model`` with ``qweights`` (``{linear name: QuantizedWeight}``) as an AWQ GEMM folder.

    Every other floating-point tensor (and each bias) is stored in ``dtype``: fp16, as AWQ engines
    expect. Raises :class:`FormatError` for weights the layout cannot hold (not 4-bit, per-channel,
    ``g_idx``, mixed group sizes, out features not a multiple of 8).
    """
    if not qweights:
        raise FormatError("nothing to save: no quantized weights were given")
    for n, qw in qweights.items():
        _check(qw, n)
    sizes = {qw.scheme.group_size for qw in qweights.values()}
    if len(sizes) != 1:
        raise FormatError(f"one group size per AWQ checkpoint, got {sorted(s or 0 for s in sizes)}; {FIX}")
    schemes = {qw.scheme.with_options(name=None) for qw in qweights.values()}
    gs = next(iter(sizes))
    scheme = next(iter(schemes)) if len(schemes) == 1 else QuantScheme(BITS, gs, False)
    ignore = check_linears(model, qweights)
    tensors = model_tensors(model, qweights, dtype)
    for n, qw in qweights.items():
        tensors.update({f"{n}.{k}": v for k, v in pack_awq(qw, n).items()})
    qc = quantization_config(int(scheme.group_size or 0), ignore)
    return write_hf_folder(model, tensors, out_dir, quantization_config=qc, dtype=dtype, tokenizer=tokenizer,
                           recipe={"scheme": scheme.to_dict(), "format": "awq-gemm", **(recipe or {})},
                           overwrite=overwrite, files=files)


def is_awq_artifact(config: dict[str, Any]) -> bool:
    """True for a config.json dict with ``quant_method: awq`` (any version; the loader reads ``gemm`` only)."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq"


def _read_gemm_config(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    if not is_awq_artifact(config):
        raise FormatError(f"{folder}: config.json has no AWQ quantization_config (quant_method: awq)")
    qc: dict[str, Any] = config["quantization_config"]
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if version != "gemm":
        raise FormatError(f"{folder}: AWQ version {version!r} is not supported; lowbit reads the 'gemm' layout only")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != BITS:
        raise FormatError(f"{folder}: {bits}-bit AWQ is not supported; lowbit reads 4-bit AWQ GEMM only")
    if qc.get("zero_point", True) is False:
        raise FormatError(f"{folder}: AWQ with zero_point false is not supported (GEMM kernels need qzeros)")
    return qc


def _recipe_symmetric(folder: Path) -> bool:
    scheme = read_record(folder).get("scheme")
    return isinstance(scheme, dict) and bool(scheme.get("symmetric", False))


def load_awq_gemm(path: str | Path, dtype: torch.dtype = torch.float32, cache: bool = True
                  ) -> tuple[nn.Module, QuantScheme]:
    """Load an AWQ GEMM folder (ours or AutoAWQ's/GPTQModel's) into a model of :class:`QuantLinear`.

    Non-quantized tensors are cast to ``dtype``; scales stay fp16, so the dequantized weights are
    exactly ``fp16 scale * (code - zero)``. With ``cache`` each layer keeps its dequantized weight
    after the first forward. The scheme is asymmetric unless lowbit's recipe says symmetric and
    every zero point is 8.
    """
    folder = Path(path)
    qc = _read_gemm_config(folder, read_config(folder))
    tensors = read_tensors(folder)
    sym = _recipe_symmetric(folder)
    model = empty_model(folder, dtype)
    names = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    if not names:
        raise FormatError(f"{folder}: no AWQ-quantized layer (no '.qweight' tensor) found")
    gs = int(qc.get("group_size", qc.get("q_group_size")) or 0)
    schemes = set()
    for name in names:
        t = {k: tensors.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales") if f"{name}.{k}" in tensors}
        qw = unpack_awq(t, gs, sym, name)
        bias = tensors.pop(f"{name}.bias", None)
        q = QuantLinear.from_qweight(qw, bias, dtype=qw.scales.dtype)
        q.cache = cache
        if bias is not None and q.bias is not None:
            q.bias.data = bias.to(dtype)
        replace_module(model, name, q)
        schemes.add(qw.scheme)
    scheme = schemes.pop() if len(schemes) == 1 else next(iter(schemes)).with_options(symmetric=False)
    return finish_load(model, tensors, names, folder, dtype), scheme
