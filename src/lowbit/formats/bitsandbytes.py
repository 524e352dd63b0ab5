"""bitsandbytes checkpoints: the folder transformers + bitsandbytes load (``quant_method: bitsandbytes``).

Per NF4/FP4 linear ``L`` (``W (out, in)``, ``B`` blocks, ``q`` = nf4 or fp4), as bitsandbytes'
``QuantState.as_dict(packed=True)`` writes them::

    L.weight                                (ceil(n/2), 1) uint8    two codes a byte, even element high
    L.weight.absmax                         (B,)  float32, or uint8 with double quantization
    L.weight.quant_map                      (16,) float32           the code book
    L.weight.nested_absmax                  (ceil(B/256),) float32  double quantization only
    L.weight.nested_quant_map               (256,) float32          double quantization only
    L.weight.quant_state.bitsandbytes__q    uint8 bytes of a JSON dict: quant_type, blocksize,
                                            dtype, shape (+ nested_blocksize, nested_dtype, nested_offset)

Per LLM.int8 linear: ``L.weight`` (out, in) int8, ``L.SCB`` (out,) float32, ``L.weight_format``
uint8 0 (row-major). lowbit's calibrated outlier columns go to a side file,
``lowbit_int8_outliers.safetensors`` (``L.outlier_idx`` int64, ``L.outlier_weight`` float16),
which transformers does not read; lowbit's loader does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lowbit.core.blockwise import Blockwise4bitWeight, Int8Weight
from lowbit.core.bnb_linear import Linear4bit, LLMInt8Linear
from lowbit.core.codebooks import code4, dynamic_map
from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import FormatError
from lowbit.formats.hf_folder import (
    check_linears,
    empty_model,
    finish_load,
    model_tensors,
    read_config,
    read_tensors,
    replace_module,
    write_hf_folder,
)

OUTLIER_FILE = "lowbit_int8_outliers.safetensors"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
BnbWeight = Blockwise4bitWeight | Int8Weight


def quantization_config(scheme: DataTypeScheme, skip: list[str], compute_dtype: torch.dtype) -> dict[str, Any]:
    four = scheme.dtype in ("nf4", "fp4")
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": four, "load_in_8bit": not four,
        "_load_in_4bit": four, "_load_in_8bit": not four,
        "bnb_4bit_quant_type": scheme.dtype if four else "fp4",
        "bnb_4bit_use_double_quant": scheme.double_quant,
        "bnb_4bit_compute_dtype": _DTYPE_NAMES[compute_dtype], "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": scheme.threshold, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_skip_modules": skip or None,
    }


def _json_tensor(d: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def pack_4bit(name: str, qw: Blockwise4bitWeight) -> dict[str, torch.Tensor]:
    """The safetensors entries of one NF4/FP4 linear (see the module docstring)."""
    p = f"{name}.weight"
    kind = qw.scheme.dtype
    meta: dict[str, Any] = {"quant_type": kind, "blocksize": qw.scheme.block_size,
                            "dtype": _DTYPE_NAMES[qw.dtype], "shape": list(qw.shape)}
    out = {p: qw.packed(), f"{p}.quant_map": code4(kind)}
    if qw.scheme.double_quant:
        assert qw.qabsmax is not None and qw.absmax2 is not None and qw.offset is not None
        out[f"{p}.absmax"] = qw.qabsmax.contiguous()
        out[f"{p}.nested_absmax"] = qw.absmax2.contiguous()
        out[f"{p}.nested_quant_map"] = dynamic_map()
        meta.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": qw.offset.item()})
    else:
        assert qw.absmax is not None
        out[f"{p}.absmax"] = qw.absmax.contiguous()
    out[f"{p}.quant_state.bitsandbytes__{kind}"] = _json_tensor(meta)
    return {k: v.cpu() for k, v in out.items()}


def save_bnb(model: nn.Module, weights: dict[str, BnbWeight], out_dir: str | Path, *, scheme: DataTypeScheme,
             tokenizer: Any = None, recipe: dict[str, Any] | None = None, dtype: torch.dtype = torch.bfloat16,
             overwrite: bool = False, files: dict[str, str] | None = None) -> Path:
    """Write ``model`` with ``weights`` (``{linear name: weight}``) as a transformers + bitsandbytes folder."""
    if not weights:
        raise FormatError("nothing to save: no quantized weights were given")
    if scheme.dtype not in ("nf4", "fp4", "int8"):
        raise FormatError(f"the bitsandbytes layout holds NF4, FP4 and LLM.int8, not {scheme.label}")
    skip = check_linears(model, weights)
    tensors = model_tensors(model, weights, dtype)
    outliers: dict[str, torch.Tensor] = {}
    for n, w in weights.items():
        if isinstance(w, Blockwise4bitWeight):
            tensors.update(pack_4bit(n, w))
        else:
            tensors[f"{n}.weight"] = w.CB.cpu().contiguous()
            tensors[f"{n}.SCB"] = w.SCB.cpu().to(torch.float32).contiguous()
            tensors[f"{n}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
            if w.outlier_idx is not None and w.outlier_weight is not None and w.outlier_idx.numel():
                outliers[f"{n}.outlier_idx"] = w.outlier_idx.cpu().to(torch.int64).contiguous()
                outliers[f"{n}.outlier_weight"] = w.outlier_weight.cpu().to(torch.float16).contiguous()
    extra = {OUTLIER_FILE: outliers} if outliers else None
    return write_hf_folder(model, tensors, out_dir, quantization_config=quantization_config(scheme, skip, dtype),
                           dtype=dtype, tokenizer=tokenizer, recipe={"scheme": scheme.to_dict(), **(recipe or {})},
                           overwrite=overwrite, extra_files=extra, files=files)


def is_bnb_artifact(config: dict[str, Any]) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "bitsandbytes"


def unpack_4bit(name: str, t: dict[str, torch.Tensor]) -> Blockwise4bitWeight:
    p = f"{name}.weight"
    key = next((k for k in t if k.startswith(f"{p}.quant_state.bitsandbytes__")), None)
    if key is None:
        raise FormatError(f"{name}: no quant_state entry; not a bitsandbytes 4-bit layer")
    meta = json.loads(bytes(t[key].tolist()).decode("utf-8"))
    kind, bs = meta["quant_type"], int(meta["blocksize"])
    nested = "nested_offset" in meta
    scheme = DataTypeScheme(kind, bs, nested, name=kind.upper())
    shape = (int(meta["shape"][0]), int(meta["shape"][1]))
    codes = Blockwise4bitWeight.unpack(t[p], shape)
    if not torch.equal(t[f"{p}.quant_map"].to(torch.float32), code4(kind)):
        raise FormatError(f"{name}: custom quant_map is not supported (expected bitsandbytes' {kind} code book)")
    dtype = _NAMED_DTYPES.get(meta["dtype"], torch.float32)
    if nested:
        return Blockwise4bitWeight(codes, scheme, qabsmax=t[f"{p}.absmax"], absmax2=t[f"{p}.nested_absmax"],
                                   offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32),
                                   dtype=dtype)
    return Blockwise4bitWeight(codes, scheme, absmax=t[f"{p}.absmax"].to(torch.float32), dtype=dtype)


def load_bnb(path: str | Path, dtype: torch.dtype = torch.float32, cache: bool = True
             ) -> tuple[nn.Module, DataTypeScheme]:
    """Load a bitsandbytes folder (ours or one saved by transformers) with lowbit's runtime modules."""
    folder = Path(path)
    config = read_config(folder)
    if not is_bnb_artifact(config):
        raise FormatError(f"{folder}: config.json has no bitsandbytes quantization_config")
    qc = config["quantization_config"]
    tensors = read_tensors(folder, exclude=[OUTLIER_FILE])
    side = load_file(str(folder / OUTLIER_FILE)) if (folder / OUTLIER_FILE).is_file() else {}
    model = empty_model(folder, dtype)
    names4 = sorted({k.split(".weight.quant_state.")[0] for k in tensors if ".weight.quant_state." in k})
    names8 = sorted({k.removesuffix(".SCB") for k in tensors if k.endswith(".SCB")})
    schemes: set[DataTypeScheme] = set()
    module: nn.Module
    for name in names4 + names8:
        bias = tensors.pop(f"{name}.bias", None)
        if name in names4:
            qw = unpack_4bit(name, tensors)
            module = Linear4bit(qw, None if bias is None else bias.to(dtype))
            module.cache = cache
            schemes.add(qw.scheme.with_options(name=None))
            for k in [k for k in tensors if k.startswith(f"{name}.weight")]:
                del tensors[k]
        else:
            scheme = DataTypeScheme("int8", activations="int8-outlier",
                                    threshold=float(qc.get("llm_int8_threshold", 6.0)), name="INT8-LLM")
            w = Int8Weight(tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.SCB").to(torch.float32), scheme,
                           side.get(f"{name}.outlier_idx"), side.get(f"{name}.outlier_weight"))
            tensors.pop(f"{name}.weight_format", None)
            module = LLMInt8Linear(w, None if bias is None else bias.to(dtype))
            schemes.add(scheme.with_options(name=None))
        replace_module(model, name, module)
    if not schemes:
        raise FormatError(f"{folder}: no bitsandbytes-quantized layer found")
    if len(schemes) != 1:
        raise FormatError(f"{folder}: several bitsandbytes schemes in one model ({len(schemes)}); not supported")
    return finish_load(model, tensors, names4 + names8, folder, dtype), next(iter(schemes))
