"""The provenance record of an artifact (``provenance.json``): how, from what and where it was made.

Timings, versions, the machine and the source model's checksum live here, apart from the recipe
(``recipe.yaml``) and the weights, so that replaying a recipe reproduces the weights byte for byte.
Paths are kept relative or dropped: a record names the source as the user gave it (an offline
source or hub id) or by its folder name.
"""

from __future__ import annotations

import hashlib
import platform
import threading
from pathlib import Path
from typing import Any

import torch

from lowbit import __version__

_CHUNK = 1 << 22


class SourceChecksum:
    """sha256 over a model's weight files (``*.safetensors``, ``*.gguf``; sorted by name, each file's name
    then its bytes), computed in a background thread while the quantization runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.value: str | None = None
        self._t = threading.Thread(target=self._run, name="lowbit-checksum", daemon=True)
        self._t.start()

    def _run(self) -> None:
        p = self.path
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".gguf"))
        h = hashlib.sha256()
        try:
            for f in files:
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        h.update(chunk)
        except OSError:
            return
        self.value = h.hexdigest()

    def result(self, timeout: float | None = None) -> str | None:
        self._t.join(timeout)
        return self.value


def machine() -> dict[str, Any]:
    """The machine a run used: platform, CPU threads, GPU name, library versions."""
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_threads":
            torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__}


def source_name(spec: str | Path, resolved: Path) -> str:
    """How a record names the source: an offline source or hub id as given, else the folder's name."""
    s = str(spec)
    if not Path(s).expanduser().exists():
        return s
    return Path(s).expanduser().resolve().name or resolved.name


def record(source: str, checksum: str | None, seconds: float, device: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"lowbit_version": __version__, "source": {"model": source, "sha256": checksum},
            "quantize_seconds": round(seconds, 2), "device": device, "machine": machine(), **extra}
