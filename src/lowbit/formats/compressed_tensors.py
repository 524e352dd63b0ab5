"""compressed-tensors ``pack-quantized`` checkpoints: the layout vLLM and transformers load.

A Hugging Face folder: ``config.json`` with a ``quantization_config`` (``quant_method:
compressed-tensors``, ``format: pack-quantized``), safetensors, the tokenizer, and
``lowbit_recipe.json``. Per quantized linear ``L`` (``W (out, in)``, ``G`` groups, ``b`` bits)::

    L.weight_packed      (out, ceil(in*b/32))  int32   signed codes + 2^(b-1), packed along in
    L.weight_scale       (out, G)              dtype   (G = 1 for per-channel)
    L.weight_shape       (2,)                  int64   [out, in]
    L.weight_zero_point  (ceil(out*b/32), G)   int32   asymmetric only: zero - 2^(b-1), packed along out
    L.weight_g_idx       (in,)                 int32   act-order only

Dense cross-element packing (:mod:`lowbit.core.packing`) is what compressed-tensors >= 0.13
writes; for 2, 4 and 8 bits it equals the older per-word packing, which every version reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.core.errors import FormatError
from lowbit.core.io import atomic_dir, write_json_atomic
from lowbit.core.packing import pack_int32, unpack_int32
from lowbit.core.qlinear import QuantLinear
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme

log = logging.getLogger(__name__)

CT_FORMAT = "pack-quantized"
CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writer follows
RECIPE_FILE = "lowbit_recipe.json"
SHARD_BYTES = 4 * 2**30


def quantization_config(scheme: QuantScheme, ignore: list[str], actorder: str | None = None) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for ``scheme``.

    ``actorder``: ``"group"`` when layers carry ``weight_g_idx``, ``"weight"`` for act-order with
    static groups (plain group layout), ``None`` otherwise.
    """
    weights = {
        "num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
        "group_size": scheme.group_size, "strategy": scheme.strategy, "block_structure": None,
        "dynamic": False, "actorder": actorder, "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": CT_FORMAT}},
        "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None, "version": CT_VERSION,
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
                   actorder: str | None = None) -> Path:
    """Write ``model`` with ``qweights`` (``{linear name: QuantizedWeight}``) as a compressed-tensors folder.

    Every other floating-point tensor is stored in ``dtype``; the folder appears atomically.
    """
    if not qweights:
        raise FormatError("nothing to save: no quantized weights were given")
    schemes = {qw.scheme.with_options(name=None) for qw in qweights.values()}
    if len(schemes) != 1:
        raise FormatError(f"one scheme per checkpoint is supported, got {len(schemes)}")
    scheme = next(iter(schemes))
    if any(qw.g_idx is not None for qw in qweights.values()):
        actorder = "group"
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | QuantLinear)}
    missing = set(qweights) - linears
    if missing:
        raise FormatError(f"quantized weights for modules the model does not have: {sorted(missing)[:3]}")
    ignore = sorted(linears - set(qweights))
    tensors: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    skip = {f"{n}.{k}" for n in qweights for k in ("weight", "weight_packed", "weight_scale",
                                                    "weight_zero", "weight_g_idx")}
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        skip.add("lm_head.weight")
    for k, v in sd.items():
        if k not in skip:
            tensors[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    for n, qw in qweights.items():
        tensors.update(pack_tensors(n, qw, dtype))
    model_config: Any = model.config
    config = model_config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config["quantization_config"] = quantization_config(scheme, ignore, actorder)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_shards(tensors, tmp)
        write_json_atomic(tmp / "config.json", config)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / RECIPE_FILE, {"scheme": scheme.to_dict(), **(recipe or {})})
    return Path(out_dir)


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    write_json_atomic(folder / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files; a corrupt file is a FormatError naming it."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder} holds no .safetensors file; is it a model folder?")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{f} is corrupt or truncated ({e}); re-export the model") from e
    return out


def read_scheme(config: dict[str, Any]) -> tuple[QuantScheme, dict[str, Any]]:
    """The lowbit scheme of a pack-quantized ``config.json`` dict, and its quantization_config."""
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise FormatError("config.json has no compressed-tensors quantization_config: not a quantized artifact")
    if qc.get("format") != CT_FORMAT:
        raise FormatError(f"format {qc.get('format')!r} is not supported by lowbit's loader (only {CT_FORMAT})")
    groups = list(qc.get("config_groups", {}).values())
    if len(groups) != 1:
        raise FormatError(f"expected one config group, found {len(groups)}")
    w = groups[0]["weights"]
    if w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
        raise FormatError(f"unsupported weight args {w}")
    gs = w.get("group_size") if w.get("strategy") == "group" else None
    return QuantScheme(int(w["num_bits"]), gs, bool(w["symmetric"])), qc


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, cache: bool = True
                   ) -> tuple[nn.Module, QuantScheme]:
    """Load a pack-quantized folder into a transformers model whose linears are :class:`QuantLinear`.

    Non-quantized tensors are cast to ``dtype``; scales stay in their stored dtype. With ``cache``
    each layer keeps its dequantized weight after the first forward (fast repeated evaluation).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef,attr-defined]

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FormatError(f"{folder} has no config.json; pass the folder written by `lowbit quantize`")
    raw = json.loads((folder / "config.json").read_text())
    scheme, qc = read_scheme(raw)
    cfg = AutoConfig.from_pretrained(folder)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    tensors = read_tensors(folder)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")})
    for name in names:
        lin = model.get_submodule(name)
        qw = unpack_tensors(name, tensors, scheme)
        bias = tensors.get(f"{name}.bias")
        q = QuantLinear.from_qweight(qw, bias, dtype=tensors[f"{name}.weight_scale"].dtype)
        q.cache = cache
        if bias is not None and q.bias is not None:
            q.bias.data = bias.to(dtype)
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, q)
        for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "bias"):
            tensors.pop(f"{name}.{k}", None)
        del lin
    result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                                   strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("weight_zero", "weight_g_idx"))
               and not (k == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False))
               and k.rsplit(".", 1)[0] not in names]
    if missing or result.unexpected_keys:
        raise FormatError(f"{folder}: checkpoint does not match the model: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model, scheme
