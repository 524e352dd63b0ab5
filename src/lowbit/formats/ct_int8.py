"""compressed-tensors ``int-quantized`` checkpoints: W8A8 (int8 weights and activations).

A Hugging Face folder as :mod:`lowbit.formats.hf_folder` writes it, laid out as compressed-tensors
0.20's own ``ModelCompressor`` writes its ``W8A8`` preset (checked in the tests against its preset
and its compressor's output). Per quantized linear ``L`` with ``W (out, in)``::

    L.weight        (out, in)   int8        signed codes in [-128, 127] (lowbit's unsigned codes - 128)
    L.weight_scale  (out, 1)    scale dtype  bfloat16 for a bfloat16 model (compressed-tensors writes
                                             the model dtype; lowbit keeps the dtype it quantized with)
    L.input_scale   (1,)        scale dtype  static activations (W8A8_STATIC) only
    L.bias          (out,)      model dtype, if the linear has one

No zero points are stored (symmetric: compressed-tensors drops them). ``W_hat = weight * weight_scale``.
Config: ``format: int-quantized`` (what compressed-tensors infers for int weights with quantized
inputs), weights ``int``/8/symmetric/``channel``/static, inputs ``int``/8/symmetric and either
``token`` dynamic (its ``W8A8`` preset) or ``tensor`` static with a per-layer ``input_scale``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import FormatError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.core.w8a8_linear import W8A8Linear
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

CT_FORMAT = "int-quantized"
CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writer follows
__all__ = ["is_w8a8_artifact", "load_w8a8", "quantization_config_w8a8", "read_w8a8_scheme", "save_w8a8"]


def _int8_args(strategy: str, *, dynamic: bool) -> dict[str, Any]:
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": strategy,
            "dynamic": dynamic}


def _check_scheme(scheme: QuantScheme) -> None:
    if scheme.act_bits != 8 or scheme.bits != 8 or scheme.group_size is not None or not scheme.symmetric:
        raise FormatError(f"the int-quantized format holds W8A8 (int8 per-channel weights, int8 activations), "
                          f"got {scheme.label}; weight-only int schemes go to pack-quantized (save_quantized)")


def quantization_config_w8a8(scheme: QuantScheme, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for a W8A8 ``scheme``; ``ignore``: linears left 16-bit."""
    _check_scheme(scheme)
    static = scheme.act_strategy == "tensor"
    inputs = _int8_args("tensor" if static else "token", dynamic=not static)
    return {
        "quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": _int8_args("channel", dynamic=False),
                                      "input_activations": inputs, "output_activations": None,
                                      "format": CT_FORMAT}},
        "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None, "version": CT_VERSION,
    }


def is_w8a8_artifact(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict describes a compressed-tensors int8 W8A8 (``int-quantized``) checkpoint."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != CT_FORMAT:
        return False
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        return False
    w, a = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    return w.get("type") == "int" and w.get("num_bits") == 8 and a.get("type") == "int" and a.get("num_bits") == 8


def read_w8a8_scheme(config: dict[str, Any]) -> QuantScheme:
    """The lowbit scheme (``W8A8`` or ``W8A8_STATIC``, unnamed) of an int-quantized ``config.json`` dict."""
    qc = config.get("quantization_config") or {}
    if not is_w8a8_artifact(config):
        raise FormatError(f"not a compressed-tensors int8 W8A8 checkpoint (quant_method {qc.get('quant_method')!r}, "
                          f"format {qc.get('format')!r}); W8A8 folders have format int-quantized with 8-bit int "
                          "weights and inputs -- load pack-quantized ones with load_quantized, float8 with load_fp8")
    g = next(iter(qc["config_groups"].values()))
    w, a = g["weights"], g["input_activations"]
    if not w.get("symmetric", True) or w.get("dynamic") or w.get("strategy") != "channel":
        raise FormatError(f"unsupported int8 weight args {w}: lowbit reads static symmetric per-channel scales only")
    if not a.get("symmetric", True):
        raise FormatError(f"unsupported input activation args {a}: lowbit runs symmetric int8 activations only")
    if a.get("strategy") == "token" and a.get("dynamic") is True:
        strategy = "token"
    elif a.get("strategy") == "tensor" and a.get("dynamic") is False:
        strategy = "tensor"
    else:
        raise FormatError(f"unsupported input activation args {a}: lowbit runs dynamic per-token or static "
                          "per-tensor int8 activations")
    return QuantScheme(8, None, True, act_bits=8, act_strategy=strategy)


def _check_weight(name: str, qw: QuantizedWeight) -> None:
    s = qw.scheme
    if s.bits != 8 or s.group_size is not None or not s.symmetric or qw.g_idx is not None:
        raise FormatError(f"{name}: int-quantized holds int8 symmetric per-channel weights, got {s.label}")


def save_w8a8(model: nn.Module, qweights: dict[str, QuantizedWeight], out_dir: str | Path, *, scheme: QuantScheme,
              tokenizer: Any = None, recipe: dict[str, Any] | None = None, dtype: torch.dtype = torch.bfloat16,
              overwrite: bool = False, input_scales: dict[str, float] | None = None,
              files: dict[str, str] | None = None) -> Path:
    """Write ``model`` with ``qweights`` (``{linear name: QuantizedWeight}``, 8-bit symmetric per channel)
    as a compressed-tensors int-quantized folder.

    ``input_scales`` (``{linear name: scale}``) must cover every linear for a static scheme and be
    absent for a dynamic one. Weight and input scales keep the weights' scale dtype; every other
    floating-point tensor is stored in ``dtype``. The folder appears atomically.
    """
    _check_scheme(scheme)
    if not qweights:
        raise FormatError("nothing to save: no quantized weights were given")
    static = scheme.act_strategy == "tensor"
    if static:
        missing = sorted(set(qweights) - set(input_scales or {}))
        if missing:
            raise FormatError(f"{scheme.label}: static activations need an input scale for every linear; "
                              f"missing {missing[:3]} (calibrate with SmoothQuantMethod)")
    elif input_scales:
        raise FormatError(f"{scheme.label}: dynamic per-token activations take no input_scales; "
                          "use W8A8_STATIC for calibrated static scales")
    for n, qw in qweights.items():
        _check_weight(n, qw)
    ignore = check_linears(model, qweights)
    tensors = model_tensors(model, qweights, dtype)
    for n, qw in qweights.items():
        tensors[f"{n}.weight"] = (qw.codes.to(torch.int16) - 128).to(torch.int8).cpu().contiguous()
        tensors[f"{n}.weight_scale"] = qw.scales.detach().cpu().reshape(-1, 1).contiguous()
        if static:
            assert input_scales is not None
            tensors[f"{n}.input_scale"] = torch.tensor([float(input_scales[n])], dtype=qw.scales.dtype)
    return write_hf_folder(model, tensors, out_dir, quantization_config=quantization_config_w8a8(scheme, ignore),
                           dtype=dtype, tokenizer=tokenizer, recipe={"scheme": scheme.to_dict(), **(recipe or {})},
                           overwrite=overwrite, files=files)


def load_w8a8(path: str | Path, dtype: torch.dtype = torch.float32, cache: bool = True
              ) -> tuple[nn.Module, QuantScheme]:
    """Load an int-quantized folder into a transformers model whose quantized linears are :class:`W8A8Linear`.

    Non-quantized tensors (and biases) are cast to ``dtype``; scales keep their stored dtype. With
    ``cache`` each layer keeps its transposed int8 weight after the first forward (faster GEMM).
    """
    folder = Path(path)
    scheme = read_w8a8_scheme(read_config(folder))
    tensors = read_tensors(folder)
    model = empty_model(folder, dtype)
    names = sorted(k.rsplit(".", 1)[0] for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.int8)
    if not names:
        raise FormatError(f"{folder}: config says int-quantized but no int8 weight is stored; re-export it")
    static = scheme.act_strategy == "tensor"
    for name in names:
        weight = tensors.pop(f"{name}.weight")
        scale = tensors.pop(f"{name}.weight_scale", None)
        iscale = tensors.pop(f"{name}.input_scale", None)
        bias = tensors.pop(f"{name}.bias", None)
        tensors.pop(f"{name}.weight_zero_point", None)  # symmetric: always 0 where a writer kept it
        tensors.pop(f"{name}.input_zero_point", None)
        out, inp = weight.shape
        if scale is None or scale.numel() != out or (static and (iscale is None or iscale.numel() != 1)):
            raise FormatError(f"{name}: int8 tensors are missing or inconsistent (weight {tuple(weight.shape)}, "
                              f"weight_scale {None if scale is None else tuple(scale.shape)}, input_scale "
                              f"{None if iscale is None else tuple(iscale.shape)}); the checkpoint is corrupt or "
                              "was not written for this scheme")
        q = W8A8Linear(inp, out, scheme, bias=bias is not None, dtype=scale.dtype)
        q.weight.copy_(weight)
        q.weight_scale.copy_(scale.reshape(out, 1))
        if q.input_scale is not None and iscale is not None:
            q.input_scale = iscale.reshape(1).clone()
        if bias is not None and q.bias is not None:
            q.bias.data = bias.to(dtype)
        q.cache = cache
        replace_module(model, name, q)
    return finish_load(model, tensors, names, folder, dtype), scheme
