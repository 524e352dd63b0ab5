"""compressed-tensors ``pack-quantized`` checkpoints: the layout vLLM and transformers load.

A Hugging Face folder: ``config.json`` with a ``quantization_config`` (``quant_method:
compressed-tensors``, ``format: pack-quantized``), safetensors, the tokenizer, and lowbit's
``recipe.yaml`` and ``provenance.json``. One ``config_groups`` entry per scheme: a single scheme
targets ``Linear``; several (per-layer overrides) each target exactly their layers
(:func:`lowbit.core.targets.compact_targets`), and the 16-bit linears are listed in ``ignore``.
Per quantized linear ``L`` (``W (out, in)``, ``G`` groups, ``b`` bits)::

    L.weight_packed      (out, ceil(in*b/32))  int32   signed codes + 2^(b-1), packed along in
    L.weight_scale       (out, G)              dtype   (G = 1 for per-channel)
    L.weight_shape       (2,)                  int64   [out, in]
    L.weight_zero_point  (ceil(out*b/32), G)   int32   asymmetric only: zero - 2^(b-1), packed along out
    L.weight_g_idx       (in,)                 int32   act-order only

Dense cross-element packing (:mod:`lowbit.core.packing`) is what compressed-tensors >= 0.13
writes; for 2, 4 and 8 bits it equals the older per-word packing, which every version reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import FormatError
from lowbit.core.packing import pack_int32, unpack_int32
from lowbit.core.qlinear import QuantLinear
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.core.targets import compact_targets, matches
from lowbit.formats.hf_folder import (
    RECORD_FILE,
    check_linears,
    empty_model,
    finish_load,
    model_tensors,
    read_config,
    read_tensors,
    replace_module,
    write_hf_folder,
)

log = logging.getLogger(__name__)

CT_FORMAT = "pack-quantized"
CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writer follows
__all__ = ["RECORD_FILE", "load_quantized", "save_quantized", "read_groups", "read_scheme", "pack_tensors",
           "unpack_tensors"]
Groups = list[tuple[QuantScheme, list[str]]]


def weight_args(scheme: QuantScheme, actorder: str | None = None) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` of ``scheme``'s weights."""
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
            "group_size": scheme.group_size, "strategy": scheme.strategy, "block_structure": None,
            "dynamic": False, "actorder": actorder if scheme.group_size is not None else None,
            "observer": "minmax", "observer_kwargs": {}}


def quantization_config(groups: QuantScheme | Groups, ignore: list[str], actorder: str | None = None
                        ) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json: one config group per ``(scheme, targets)``.

    ``actorder``: ``"group"`` when layers carry ``weight_g_idx``, ``"weight"`` for act-order with
    static groups (plain group layout), ``None`` otherwise.
    """
    if isinstance(groups, QuantScheme):
        groups = [(groups, ["Linear"])]
    cg = {f"group_{i}": {"targets": list(t), "weights": weight_args(s, actorder), "input_activations": None,
                         "output_activations": None, "format": CT_FORMAT} for i, (s, t) in enumerate(groups)}
    return {
        "quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
        "config_groups": cg, "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {},
        "transform_config": {}, "global_compression_ratio": None, "version": CT_VERSION,
    }


def pack_tensors(name: str, qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The safetensors entries of one quantized linear (see the module docstring)."""
    b = qw.scheme.bits
    out = {f"{name}.weight_packed": pack_int32(qw.codes, b, dim=1),
           f"{name}.weight_scale": qw.scales.to(dtype).contiguous(),
           f"{name}.weight_shape": torch.tensor(qw.shape, dtype=torch.int64)}
    if not qw.scheme.symmetric:
        out[f"{name}.weight_zero_point"] = pack_int32(qw.zeros, b, dim=0)
    if qw.g_idx is not None:
        out[f"{name}.weight_g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    return out


def unpack_tensors(name: str, t: dict[str, torch.Tensor], scheme: QuantScheme) -> QuantizedWeight:
    """Inverse of :func:`pack_tensors`."""
    try:
        out, inp = (int(v) for v in t[f"{name}.weight_shape"].tolist())
        codes = unpack_int32(t[f"{name}.weight_packed"], scheme.bits, inp, dim=1)
        scales = t[f"{name}.weight_scale"]
        zp = t.get(f"{name}.weight_zero_point")
        zeros = (torch.full(scales.shape, scheme.sym_zero, dtype=torch.uint8) if zp is None
                 else unpack_int32(zp, scheme.bits, out, dim=0))
        return QuantizedWeight(codes, scales, zeros, scheme, t.get(f"{name}.weight_g_idx"))
    except (KeyError, ValueError) as e:
        raise FormatError(f"{name}: quantized tensors are missing or inconsistent ({e}); "
                          "the checkpoint is corrupt or was not written by a pack-quantized writer") from e


def save_quantized(model: nn.Module, qweights: dict[str, QuantizedWeight], out_dir: str | Path, *,
                   tokenizer: Any = None, recipe: dict[str, Any] | None = None,
                   dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
                   actorder: str | None = None, files: dict[str, str] | None = None) -> Path:
    """Write ``model`` with ``qweights`` (``{linear name: QuantizedWeight}``) as a compressed-tensors folder.

    Every other floating-point tensor is stored in ``dtype``; the folder appears atomically. ``recipe``
    is the provenance record (``provenance.json``), ``files`` more text files (``recipe.yaml``).
    """
    if not qweights:
        raise FormatError("nothing to save: no quantized weights were given")
    by_scheme: dict[QuantScheme, list[str]] = {}
    for n, qw in qweights.items():
        by_scheme.setdefault(qw.scheme.with_options(name=None), []).append(n)
    if len(by_scheme) == 1:
        groups: Groups = [(next(iter(by_scheme)), ["Linear"])]
    else:
        groups = [(sc, compact_targets(names)) for sc, names in by_scheme.items()]
    if any(qw.g_idx is not None for qw in qweights.values()):
        actorder = "group"
        log.warning("this artifact stores g_idx (GPTQ dynamic groups, actorder: group): lowbit reads it, but "
                    "compressed-tensors >= 0.19 (and transformers and vLLM with it) refuse it; the default static "
                    "groups (act-order without --dynamic-groups) cost nothing and load everywhere")
    ignore = check_linears(model, qweights)
    tensors = model_tensors(model, qweights, dtype)
    for n, qw in qweights.items():
        tensors.update(pack_tensors(n, qw, dtype))
    record = {"scheme": groups[0][0].to_dict(), **(recipe or {})}
    if len(groups) > 1:
        record["schemes"] = [sc.to_dict() for sc, _ in groups]
    return write_hf_folder(model, tensors, out_dir, quantization_config=quantization_config(groups, ignore, actorder),
                           dtype=dtype, tokenizer=tokenizer, recipe=record, overwrite=overwrite, files=files)


def read_groups(config: dict[str, Any]) -> tuple[Groups, dict[str, Any]]:
    """``[(scheme, targets)]`` of a pack-quantized ``config.json`` dict, and its quantization_config."""
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise FormatError("config.json has no compressed-tensors quantization_config: not a quantized artifact")
    if qc.get("format") != CT_FORMAT:
        raise FormatError(f"format {qc.get('format')!r} is not supported by lowbit's loader (only {CT_FORMAT})")
    groups: Groups = []
    for gname, g in (qc.get("config_groups") or {}).items():
        w = g.get("weights") or {}
        if w.get("type") != "int" or w.get("strategy") not in ("group", "channel") or g.get("input_activations"):
            raise FormatError(f"config group {gname}: unsupported weight args {w}")
        gs = w.get("group_size") if w.get("strategy") == "group" else None
        groups.append((QuantScheme(int(w["num_bits"]), gs, bool(w["symmetric"])), list(g.get("targets") or [])))
    if not groups:
        raise FormatError("config.json's quantization_config has no config_groups")
    return groups, qc


def scheme_for(name: str, groups: Groups) -> QuantScheme:
    """The scheme of the quantized linear ``name``: its group by exact name, then ``re:``, then ``Linear``
    (compressed-tensors' precedence)."""
    for kind in ("name", "re", "Linear"):
        for s, targets in groups:
            for t in targets:
                hit = (t == name if kind == "name" else
                       t.startswith("re:") and matches(t, name) if kind == "re" else t == "Linear")
                if hit:
                    return s
    raise FormatError(f"{name}: no config group of quantization_config targets this layer")


def read_scheme(config: dict[str, Any]) -> tuple[QuantScheme, dict[str, Any]]:
    """The one scheme of a single-group pack-quantized ``config.json`` dict, and its quantization_config."""
    groups, qc = read_groups(config)
    if len(groups) != 1:
        raise FormatError(f"this artifact has {len(groups)} schemes (per-layer overrides); read it with read_groups")
    return groups[0][0], qc


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, cache: bool = True
                   ) -> tuple[nn.Module, QuantScheme]:
    """Load a pack-quantized folder into a transformers model whose linears are :class:`QuantLinear`.

    Non-quantized tensors are cast to ``dtype``; scales stay in their stored dtype. With ``cache``
    each layer keeps its dequantized weight after the first forward (fast repeated evaluation).
    """
    folder = Path(path)
    groups, _ = read_groups(read_config(folder))
    tensors = read_tensors(folder)
    model = empty_model(folder, dtype)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")})
    for name in names:
        qw = unpack_tensors(name, tensors, scheme_for(name, groups))
        bias = tensors.get(f"{name}.bias")
        q = QuantLinear.from_qweight(qw, bias, dtype=tensors[f"{name}.weight_scale"].dtype)
        q.cache = cache
        if bias is not None and q.bias is not None:
            q.bias.data = bias.to(dtype)
        replace_module(model, name, q)
        for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "bias"):
            tensors.pop(f"{name}.{k}", None)
    return finish_load(model, tensors, names, folder, dtype), groups[0][0]
