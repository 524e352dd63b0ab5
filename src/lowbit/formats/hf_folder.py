"""The Hugging Face model folder every lowbit format writes and reads, written down once.

A folder holds ``config.json`` (with the format's ``quantization_config``), safetensors shards
(4 GiB each, with ``model.safetensors.index.json`` when there are several), the generation
config, the tokenizer, ``recipe.yaml`` (the exact recipe that made it, written by the job layer) and
``provenance.json`` (versions, source, timings, what each method reported). The folder appears
atomically: it is built beside the target and renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.core.errors import FormatError
from lowbit.core.io import atomic_dir, write_json_atomic, write_text_atomic

RECORD_FILE = "provenance.json"
RECIPE_FILE = "recipe.yaml"
LEGACY_RECORD_FILE = "lowbit_recipe.json"  # written by lowbit before recipes
SHARD_BYTES = 4 * 2**30


def model_tensors(model: nn.Module, replaced: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict minus the tensors of the ``replaced`` (quantized) modules.

    Floating-point tensors are cast to ``dtype``; a tied ``lm_head.weight`` is left out.
    """
    names = set(replaced)
    skip_tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out = {}
    for k, v in model.state_dict().items():
        module = k.rsplit(".", 1)[0]
        if module in names and k != f"{module}.bias":
            continue
        if skip_tied and k == "lm_head.weight":
            continue
        out[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    return out


def check_linears(model: nn.Module, quantized: Iterable[str]) -> list[str]:
    """The linear layers left unquantized (a format's ``ignore`` list); refuses names the model lacks.

    A linear is an ``nn.Linear`` or any lowbit runtime module (it has ``in_features``).
    """
    names = set(quantized)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "in_features")}
    missing = names - linears
    if missing:
        raise FormatError(f"quantized weights for modules the model does not have: {sorted(missing)[:3]}")
    return sorted(linears - names)


def write_hf_folder(model: nn.Module, tensors: dict[str, torch.Tensor], out_dir: str | Path, *,
                    quantization_config: dict[str, Any], dtype: torch.dtype, tokenizer: Any = None,
                    recipe: dict[str, Any] | None = None, overwrite: bool = False,
                    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
                    files: dict[str, str] | None = None) -> Path:
    """Write a complete model folder atomically: ``recipe`` is the provenance record (``provenance.json``),
    ``files`` more text files by name (``recipe.yaml``), ``extra_files`` more safetensors files by name."""
    model_config: Any = model.config
    config = model_config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config.pop("_name_or_path", None)  # the machine path of the source: provenance.json names the source
    config["quantization_config"] = quantization_config
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_shards(tensors, tmp)
        for fname, extra in (extra_files or {}).items():
            save_file(extra, str(tmp / fname), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", config)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / RECORD_FILE, recipe or {})
        for fname, text in (files or {}).items():
            write_text_atomic(tmp / fname, text)
    return Path(out_dir)


def write_shards(tensors: dict[str, torch.Tensor], folder: Path) -> None:
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


def read_record(folder: str | Path) -> dict[str, Any]:
    """An artifact's provenance record (``provenance.json``, or an older ``lowbit_recipe.json``), or {}."""
    for name in (RECORD_FILE, LEGACY_RECORD_FILE):
        f = Path(folder) / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def read_config(folder: str | Path) -> dict[str, Any]:
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise FormatError(f"{folder} has no config.json; pass the folder written by `lowbit quantize`")
    try:
        config: dict[str, Any] = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{f} is not valid JSON ({e}); re-export the model") from e
    return config


def read_tensors(folder: Path, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's model safetensors files; a corrupt file is a FormatError naming it."""
    skip = set(exclude)
    files = sorted(f for f in folder.glob("*.safetensors") if f.name not in skip)
    if not files:
        raise FormatError(f"{folder} holds no .safetensors file; is it a model folder?")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{f} is corrupt or truncated ({e}); re-export the model") from e
    return out


def empty_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The folder's architecture with uninitialised weights and no quantization config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef,attr-defined]

    try:
        cfg = AutoConfig.from_pretrained(folder)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        with torch.device("meta"):  # sizes first: a crafted config must not make us allocate terabytes
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg, dtype=dtype).parameters())
        stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        if n * dtype.itemsize > MAX_EXPANSION * stored + (64 << 20):
            raise FormatError(f"{folder}/config.json describes {n} parameters, far more than its "
                              f"{stored} bytes of weights hold; the config does not belong to these weights. "
                              "Fix: restore config.json or re-export the artifact")
        with no_init_weights():
            model: nn.Module = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except FormatError:
        raise
    except (ValueError, KeyError, AttributeError, TypeError, RuntimeError, OSError, IndexError) as e:
        raise FormatError(f"{folder}/config.json does not describe a model transformers can build "
                          f"({type(e).__name__}: {str(e)[:300]}). Fix: restore config.json or re-export the "
                          "artifact") from None
    return model


#: dense float32 bytes per stored byte a config may claim (2-bit codes: 16x, plus scales and slack)
MAX_EXPANSION = 32


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).register_module(child, module)


def finish_load(model: nn.Module, tensors: dict[str, torch.Tensor], replaced: Iterable[str], folder: Path,
                dtype: torch.dtype) -> nn.Module:
    """Load the remaining (unquantized) tensors, check nothing is missing or left over, tie, eval."""
    names = set(replaced)
    try:
        result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                                       strict=False)
    except RuntimeError as e:  # shapes that do not match the config
        raise FormatError(f"{folder}: the weights do not match config.json ({str(e)[:300]}). Fix: restore "
                          "config.json or re-export the artifact") from None
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if k.rsplit(".", 1)[0] not in names
               and not (k == "lm_head.weight" and tied)]
    if missing or result.unexpected_keys:
        raise FormatError(f"{folder}: checkpoint does not match the model: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    if tied:
        model.tie_weights()  # type: ignore[operator]
    model.eval()
    return model
