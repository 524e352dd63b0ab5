"""GGUF jobs behind the CLI: export any model to a GGUF file type, compute an importance matrix."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lowbit.core.errors import LowbitError
from lowbit.formats.gguf.imatrix import Imatrix, load_imatrix, save_imatrix
from lowbit.formats.gguf.writer import GGUFReport, write_gguf

log = logging.getLogger(__name__)


@contextmanager
def model_folder(spec: str, scratch: Path) -> Iterator[Path]:
    """A Hugging Face folder for ``spec``: offline source, folder, hub id, or a ``.gguf`` (dequantized once)."""
    from lowbit.models.sources import SOURCES, ensure_source

    path = Path(spec).expanduser()
    if spec in SOURCES and not path.exists():
        yield ensure_source(spec)
    elif path.is_dir():
        yield path
    elif path.is_file() and path.suffix == ".gguf":
        from lowbit.models.loader import load_model

        lm = load_model(path)
        tmp = Path(tempfile.mkdtemp(prefix=".lowbit-dequant-", dir=scratch))
        try:
            lm.model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif path.exists():
        raise LowbitError(f"{spec} is neither a model folder nor a .gguf file")
    else:
        try:
            from huggingface_hub import snapshot_download

            yield Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja",
                                                                 "*.txt"]))
        except Exception as e:  # noqa: BLE001 (hub errors come in many types)
            raise LowbitError(f"cannot find model {spec!r} (not a source name, folder, .gguf, or reachable hub "
                              f"id: {e})") from e


def export_gguf(spec: str, out: str | Path, file_type: str | None = None, *, imatrix: str | Path | None = None,
                device: str | None = None, force: bool = False, types: dict[str, str] | None = None) -> GGUFReport:
    """Write ``spec`` as a GGUF ``file_type`` file at ``out`` (llama.cpp's types, mixing rules and bytes).

    ``file_type`` None: ``AUTO`` for a lowbit-quantized folder (keeps its codes where a type holds them),
    else Q4_K_M. ``types`` (GGUF name -> type, e.g. a :mod:`lowbit.mixed` allocation) sets every tensor's type;
    ``file_type`` is then the report's label (default ``MIX``).
    """
    out = Path(out)
    if out.exists() and not force:
        raise LowbitError(f"{out} exists; pass --force to replace it")
    im = load_imatrix(imatrix) if imatrix else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with model_folder(spec, out.parent) as folder:
        if file_type is None and types is not None:
            file_type = "MIX"
        if file_type is None:
            from lowbit.formats.hf_folder import read_config

            file_type = "AUTO" if "quantization_config" in read_config(folder) else "Q4_K_M"
        rep = write_gguf(folder, out, file_type, imatrix=im, device=device, types=types)
    if im is not None and rep.no_imatrix:
        log.warning("no imatrix entry for %d tensor(s) (quantized without one): %s", len(rep.no_imatrix),
                    ", ".join(rep.no_imatrix[:5]))
    return rep


def gguf_names(model: Any, names: list[str]) -> dict[str, str]:
    """Hugging Face linear names (``model.layers.0.self_attn.q_proj``) -> GGUF tensor names (``blk.0.attn_q``)."""
    from lowbit.formats.gguf.convert import ARCHS

    arch = next((a for a in (model.config.architectures or []) if a in ARCHS), None)
    if arch is None:
        raise LowbitError(f"architecture {model.config.architectures} has no GGUF mapping")
    tmap = gguf.get_tensor_name_map(ARCHS[arch].arch, model.config.num_hidden_layers)
    out = {}
    for n in names:
        g = tmap.get_name(n + ".weight", try_suffixes=(".weight",))
        if g is None:
            raise LowbitError(f"linear {n} has no GGUF tensor name")
        out[n] = g
    return out


def compute_imatrix(spec: str, out: str | Path, *, calib: str | None = None, samples: int = 128,
                    length: int = 512, seed: int = 0, device: str = "cpu", progress: bool = True) -> Imatrix:
    """llama.cpp-format importance matrix of ``spec`` on calibration text, written to ``out`` (GGUF)."""
    from lowbit.data import calibration_texts, calibration_tokens
    from lowbit.models.loader import load_model
    from lowbit.pipeline.imatrix import collect_imatrix

    t0 = time.perf_counter()
    lm = load_model(spec)
    calib, texts, _ = calibration_texts(calib)
    tokens = calibration_tokens(lm.tokenizer, texts, samples, length, seed=seed)
    col = collect_imatrix(lm.model, tokens, device=device, progress=progress)
    names = gguf_names(lm.model, list(col.sums))
    im = Imatrix(datasets=[calib], chunk_count=int(tokens.shape[0]), chunk_size=int(tokens.shape[1]))
    for n, s in col.sums.items():
        g = names[n]
        im.sums[g] = s.float().numpy().reshape(1, -1)
        im.counts[g] = np.array([col.counts[n]], dtype=np.float32)
    save_imatrix(im, out)
    log.info("imatrix of %d matrices from %d x %d tokens in %.1f s -> %s", len(im.sums), tokens.shape[0],
             tokens.shape[1], time.perf_counter() - t0, out)
    return im
