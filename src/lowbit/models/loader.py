"""Load a causal LM and its tokenizer from an offline source, a folder, a GGUF file or a hub id.

Every failure is a :class:`~lowbit.core.errors.ModelLoadError` that names the file at fault and
says how to fix it. Checkpoint files are checked before transformers touches them (GGUF magic,
safetensors header and length), so a truncated download is reported as such and not as an
obscure library error. Nothing is written to disk by this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from lowbit.core.errors import ModelLoadError
from lowbit.models.sources import SOURCES, ensure_source, list_sources

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "float64": torch.float64,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


@dataclass
class LoadedModel:
    """A model ready for inference and the facts about where it came from.

    ``storage_dtype`` is the dtype the checkpoint is stored in (config ``dtype``/``torch_dtype``;
    float32 for a GGUF file, which transformers dequantizes to float32). ``compute_dtype`` is the
    dtype the weights were loaded in.
    """

    model: Any
    tokenizer: Any
    path: Path
    name: str
    storage_dtype: torch.dtype
    compute_dtype: torch.dtype


def model_size_bytes(path: str | Path) -> int:
    """Bytes of the weights at ``path``: the file itself, or the safetensors/GGUF files of a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".gguf"))


def _config_dtype(config: dict) -> torch.dtype:
    raw = config.get("dtype") or config.get("torch_dtype")
    if raw is None and isinstance(config.get("text_config"), dict):
        raw = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    return _DTYPES.get(str(raw).replace("torch.", ""), torch.float32) if raw else torch.float32


def _resolve_dtype(dtype: torch.dtype | None, storage: torch.dtype, device: str) -> torch.dtype:
    """``dtype`` if given; else float32 on CPU (fast and exact there) and the storage dtype elsewhere."""
    if dtype is not None:
        return dtype
    return torch.float32 if torch.device(device).type == "cpu" else storage


def check_gguf(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is a complete GGUF file (magic, header, tensor data)."""
    from lowbit.models.gguf_header import read_header

    read_header(path)  # every count, size and offset checked against the file (lowbit.models.gguf_header)


SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own limit
_ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "F4": 1, "F6_E2M3": 1,
             "F6_E3M2": 1}


def _safetensors_extent(header: Any) -> int:
    """The data size a safetensors header declares, after checking each entry as the safetensors library
    does: known dtype, shape of non-negative ints, ``data_offsets`` matching the shape, no hole or overlap."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    spans = []
    for k, v in header.items():
        if k == "__metadata__":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                raise ValueError("__metadata__ must map strings to strings")
            continue
        if not isinstance(v, dict) or v.get("dtype") not in _ST_BYTES:
            raise ValueError(f"tensor {k!r}: unknown dtype or entry {str(v)[:80]}")
        shape, offs = v.get("shape"), v.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62
                                                  for d in shape):
            raise ValueError(f"tensor {k!r}: shape {str(shape)[:80]} is not a list of sizes")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                  for o in offs) and 0 <= offs[0] <= offs[1]):
            raise ValueError(f"tensor {k!r}: data_offsets {str(offs)[:80]} is not [begin, end]")
        n = 1
        for d in shape:
            n *= d
        if v["dtype"] not in ("F4", "F6_E2M3", "F6_E3M2") and n * _ST_BYTES[v["dtype"]] != offs[1] - offs[0]:
            raise ValueError(f"tensor {k!r}: {offs[1] - offs[0]} bytes do not hold shape {shape} of {v['dtype']}")
        spans.append((offs[0], offs[1]))
    pos = 0
    for b, e in sorted(spans):
        if b != pos:
            raise ValueError(f"tensor data has a hole or an overlap at byte {min(b, pos)}")
        pos = e
    return pos


def check_safetensors(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` has a readable header and the bytes it declares."""
    fix = "Fix: re-download or re-save the checkpoint; if it is a lowbit cache folder, delete it."
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, SAFETENSORS_MAX_HEADER):
                raise ValueError(f"header length {n} exceeds the file or {SAFETENSORS_MAX_HEADER} bytes")
            header = json.loads(f.read(n))
        end = _safetensors_extent(header)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise ModelLoadError(f"safetensors file {path} is corrupt ({str(exc)[:300]}). {fix}") from exc
    if 8 + n + end != size:
        raise ModelLoadError(
            f"safetensors file {path} is truncated or padded "
            f"({size} bytes, header declares {8 + n + end}). {fix}"
        )


def _check_folder(folder: Path, allow_quantized: bool) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder. "
            f"Fix: pass the folder that holds config.json, a .gguf file, "
            f"or one of: {', '.join(list_sources())}."
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{cfg_path} is not valid JSON ({exc}). Fix: restore or re-save the model."
        ) from exc
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method in ("compressed-tensors", "bitsandbytes", "awq") and not allow_quantized:
        raise ModelLoadError(
            f"{folder} is a quantized artifact ({method}); this loader reads dense checkpoints only. "
            f"Fix: evaluate it with `lowbit eval {folder}` or load it with lowbit.load({str(folder)!r})."
        )
    for st in sorted(folder.glob("*.safetensors")):
        check_safetensors(st)
    return config


def check_spec(spec: str | Path) -> None:
    """Refuse, without loading anything, a model spec that cannot name a model: a missing path, a file that
    is not a .gguf, a folder without config.json, or a string that is no offline source nor hub id."""
    text = str(spec)
    path = Path(text).expanduser()
    if text in SOURCES and not path.exists():
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json, so it is not a model folder. Fix: pass the folder "
                                 f"that holds config.json, a .gguf file, or one of: {', '.join(list_sources())}")
        return
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; single files are read only as GGUF. Fix: pass the "
                                 "folder that holds config.json, or a .gguf file")
        return
    looks_local = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1
    if looks_local or not _HUB_ID.match(text):
        raise ModelLoadError(f"no such file or folder: {text}. Fix: pass a model folder, a .gguf file, a hub id, "
                             f"or one of the offline sources: {', '.join(list_sources())}")


def peek_config(spec: str | Path) -> dict | None:
    """A model's ``config.json`` without loading (or fetching) anything: a local folder's, or a cached offline
    source's; None for a GGUF, a hub id or a source not yet fetched."""
    from lowbit.models.sources import cache_root

    text = str(spec)
    path = Path(text).expanduser()
    if text in SOURCES and not path.exists():
        path = cache_root() / "models" / text
    f = path / "config.json"
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("text_config", cfg) if isinstance(cfg, dict) else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(
    where: str, what: str, dtype: torch.dtype, fix: str, **kw: Any
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"could not load {what} ({type(exc).__name__}: {exc}). {fix}") from exc
    except Exception as exc:  # e.g. safetensors_rust.SafetensorError, which is no OSError
        if type(exc).__name__ in ("SafetensorError", "HeaderTooLarge", "UnpicklingError"):
            raise ModelLoadError(f"could not read the weights of {what} ({exc}). {fix}") from exc
        raise
    return model, tokenizer


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    allow_quantized: bool = False,
) -> LoadedModel:
    """Load a causal LM in eval mode with ``use_cache`` off, and its tokenizer.

    ``spec`` is an offline source name (see :func:`~lowbit.models.sources.list_sources`), a folder
    with ``config.json``, a ``.gguf`` file (dequantized through transformers) or a hub id.
    ``dtype=None`` means float32 on CPU and the storage dtype on other devices. A compressed-tensors
    folder is refused unless ``allow_quantized`` is true. The tokenizer is returned as saved (no
    pad token is added) and the model is not modified beyond ``eval()`` and ``use_cache=False``.
    """
    text = str(spec)
    path = Path(text).expanduser()
    fix = "Fix: re-download or re-save the checkpoint, or upgrade transformers."
    if text in SOURCES and not path.exists():
        path = ensure_source(text)
        name = text
    else:
        name = path.stem if path.suffix == ".gguf" else path.name
    if path.is_dir():
        config = _check_folder(path, allow_quantized)
        storage = _config_dtype(config)
        compute = _resolve_dtype(dtype, storage, device)
        model, tok = _from_pretrained(str(path), f"model folder {path}", compute, fix)
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf; single files are read only as GGUF. "
                f"Fix: pass the folder that holds config.json, or a .gguf file."
            )
        check_gguf(path)
        storage = torch.float32
        compute = _resolve_dtype(dtype, storage, device)
        model, tok = _from_pretrained(
            str(path.parent), f"GGUF file {path}", compute, fix + " The architecture may have no GGUF "
            "support in transformers; convert it to a safetensors folder instead.", gguf_file=path.name,
        )
        model.hf_quantizer = None  # weights come back dense; keep save_pretrained usable
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        model, tok, storage, compute, name = _load_hub(text, dtype, device)
    model.config.use_cache = False
    model.eval()
    model.to(device)
    logger.info("loaded %s (%s) in %s on %s", name, type(model).__name__, compute, device)
    return LoadedModel(model, tok, path, name, storage, compute)


def _load_hub(
    spec: str, dtype: torch.dtype | None, device: str
) -> tuple[Any, Any, torch.dtype, torch.dtype, str]:
    offline_fix = (
        f"Fix: pass a local folder with config.json or a .gguf file, or one of the offline sources: "
        f"{', '.join(list_sources())}."
    )
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_local or not _HUB_ID.match(spec):
        raise ModelLoadError(f"no such file or folder: {spec}. {offline_fix}")
    from transformers import AutoConfig

    online = _hub_reachable()
    kw: dict[str, Any] = {} if online else {"local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(spec, **kw).to_dict()
    except _LOAD_ERRORS as exc:
        where = "on the hub" if online else "locally (the hub is unreachable, and it is not in the HF cache)"
        raise ModelLoadError(
            f"{spec!r} is neither a local path nor found {where} ({' '.join(str(exc).split())}). {offline_fix}"
        ) from exc
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        raise ModelLoadError(
            f"{spec} is a quantized artifact (compressed-tensors). "
            f"Fix: load it with lowbit.formats.compressed_tensors.load_quantized."
        )
    storage = _config_dtype(config)
    compute = _resolve_dtype(dtype, storage, device)
    model, tok = _from_pretrained(spec, f"hub model {spec}", compute, offline_fix, **kw)
    return model, tok, storage, compute, spec
