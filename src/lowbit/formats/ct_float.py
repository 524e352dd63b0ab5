"""compressed-tensors float8 checkpoints (``float-quantized`` / ``naive-quantized``): FP8 and FP8_DYNAMIC.

A Hugging Face folder as :mod:`lowbit.formats.hf_folder` writes it, with a ``quantization_config``
laid out as compressed-tensors 0.20 itself writes it (checked in the tests against its presets and
its own compressor's output). Per quantized linear ``L`` with ``W (out, in)``::

    L.weight        (out, in)                        float8_e4m3fn
    L.weight_scale  (out, 1)                         storage dtype (bfloat16 by default)   per channel
                    (ceil(out/B), ceil(in/B))        storage dtype                         B x B blocks
    L.bias          (out,)                           model dtype, if the linear has one

``W_hat = float(weight) * weight_scale`` (broadcast per channel, repeated over each block).
Config format: compressed-tensors infers ``float-quantized`` when activations are quantized too
(FP8_DYNAMIC: per-token dynamic float8 inputs) and ``naive-quantized`` for weight-only float8
(its ``FloatQuantizationCompressor`` needs input activations); both name the same compressor
(a plain ``.to(float8)`` / ``float(q) * scale``) and vLLM accepts both. This writer does the same.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import FormatError
from lowbit.core.fp8_linear import FP8Linear, FP8Weight, fp8_dtype
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

log = logging.getLogger(__name__)

CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writer follows
FLOAT_FORMATS = ("float-quantized", "naive-quantized")
__all__ = ["is_fp8_artifact", "load_fp8", "quantization_config_fp8", "read_fp8_scheme", "save_fp8"]


def _float8_args(strategy: str, *, dynamic: bool, block: int | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                            "strategy": strategy, "dynamic": dynamic}
    if block is not None:
        args["block_structure"] = [block, block]
    return args


def ct_format(scheme: DataTypeScheme) -> str:
    """The format compressed-tensors infers for ``scheme`` (see the module docstring)."""
    return "float-quantized" if scheme.activations == "fp8-token" else "naive-quantized"


def quantization_config_fp8(scheme: DataTypeScheme, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for an FP8 ``scheme``; ``ignore``: linears left 16-bit.

    Weights: float8 static symmetric, ``channel`` (``block_size`` None) or ``block`` ``[B, B]``.
    Inputs: ``None`` (weight-only) or float8 dynamic symmetric per ``token`` (FP8_DYNAMIC).
    """
    if scheme.dtype != "fp8_e4m3":
        raise FormatError(f"the float-quantized format holds FP8 E4M3 schemes, got {scheme.dtype!r}")
    bs = scheme.block_size
    weights = _float8_args("channel" if bs is None else "block", dynamic=False, block=bs)
    inputs = _float8_args("token", dynamic=True) if scheme.activations == "fp8-token" else None
    fmt = ct_format(scheme)
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                      "output_activations": None, "format": fmt}},
        "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None, "version": CT_VERSION,
    }


def is_fp8_artifact(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict describes a compressed-tensors float8 (E4M3) checkpoint."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") not in FLOAT_FORMATS:
        return False
    groups = list((qc.get("config_groups") or {}).values())
    w = (groups[0].get("weights") or {}) if len(groups) == 1 else {}
    return w.get("type") == "float" and w.get("num_bits") == 8


def read_fp8_scheme(config: dict[str, Any]) -> DataTypeScheme:
    """The lowbit scheme of a float8 ``config.json`` dict; a :class:`FormatError` for anything else."""
    qc = config.get("quantization_config") or {}
    if not is_fp8_artifact(config):
        raise FormatError(f"not a compressed-tensors float8 checkpoint (quant_method {qc.get('quant_method')!r}, "
                          f"format {qc.get('format')!r}); FP8 folders have format float-quantized or "
                          "naive-quantized with 8-bit float weights -- load int checkpoints with load_quantized")
    g = next(iter(qc["config_groups"].values()))
    w, a = g["weights"], g.get("input_activations")
    if not w.get("symmetric", True) or w.get("dynamic"):
        raise FormatError(f"unsupported float8 weight args {w}: lowbit reads static symmetric scales only")
    bsz = list(w.get("block_structure") or [])
    if w.get("strategy") == "channel":
        block = None
    elif w.get("strategy") == "block" and len(bsz) == 2 and bsz[0] == bsz[1]:
        block = int(bsz[0])
    else:
        raise FormatError(f"unsupported float8 weight strategy {w.get('strategy')!r} "
                          f"(block {w.get('block_structure')}): lowbit reads channel or square blocks")
    if a is None:
        acts = None
    elif a.get("type") == "float" and a.get("num_bits") == 8 and a.get("strategy") == "token" and a.get("dynamic"):
        acts = "fp8-token"
    else:
        raise FormatError(f"unsupported input activation args {a}: lowbit runs dynamic per-token float8 only")
    return DataTypeScheme("fp8_e4m3", block, activations=acts)


def save_fp8(model: nn.Module, fweights: dict[str, FP8Weight], out_dir: str | Path, *, scheme: DataTypeScheme,
             tokenizer: Any = None, recipe: dict[str, Any] | None = None, dtype: torch.dtype = torch.bfloat16,
             overwrite: bool = False, files: dict[str, str] | None = None) -> Path:
    """Write ``model`` with ``fweights`` (``{linear name: FP8Weight}``) as a compressed-tensors folder.

    Float8 weights and scales are written as they are (scales keep their dtype); every other
    floating-point tensor is stored in ``dtype``. The folder appears atomically.
    """
    if not fweights:
        raise FormatError("nothing to save: no FP8 weights were given")
    want = scheme.with_options(name=None)
    for n, fw in fweights.items():
        if fw.scheme.with_options(name=None) != want:
            raise FormatError(f"{n}: weight scheme {fw.scheme.label} differs from the checkpoint's {scheme.label}; "
                              "one scheme per checkpoint")
    ignore = check_linears(model, fweights)
    tensors = model_tensors(model, fweights, dtype)
    for n, fw in fweights.items():
        tensors[f"{n}.weight"] = fw.weight.detach().cpu().contiguous()
        tensors[f"{n}.weight_scale"] = fw.scale.detach().cpu().contiguous()
    return write_hf_folder(model, tensors, out_dir, quantization_config=quantization_config_fp8(scheme, ignore),
                           dtype=dtype, tokenizer=tokenizer, recipe={"scheme": scheme.to_dict(), **(recipe or {})},
                           overwrite=overwrite, files=files)


def load_fp8(path: str | Path, dtype: torch.dtype = torch.float32, cache: bool = True
             ) -> tuple[nn.Module, DataTypeScheme]:
    """Load a float8 folder into a transformers model whose quantized linears are :class:`FP8Linear`.

    Non-quantized tensors (and biases) are cast to ``dtype``; scales keep their stored dtype. With
    ``cache`` each layer keeps its dense operand after the first forward (fast repeated evaluation).
    """
    folder = Path(path)
    scheme = read_fp8_scheme(read_config(folder))
    f8 = fp8_dtype()
    tensors = read_tensors(folder)
    model = empty_model(folder, dtype)
    names = sorted(k.rsplit(".", 1)[0] for k, v in tensors.items() if k.endswith(".weight") and v.dtype == f8)
    if not names:
        raise FormatError(f"{folder}: config says float8 but no float8_e4m3fn weight is stored; re-export it")
    for name in names:
        try:
            fw = FP8Weight(tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale"), scheme)
        except (KeyError, ValueError) as e:
            raise FormatError(f"{name}: float8 tensors are missing or inconsistent ({e}); the checkpoint is "
                              "corrupt or was not written for this scheme") from e
        bias = tensors.pop(f"{name}.bias", None)
        q = FP8Linear.from_weight(fw, None if bias is None else bias.to(dtype))
        q.cache = cache
        replace_module(model, name, q)
    return finish_load(model, tensors, names, folder, dtype), scheme
