"""Importance matrices as llama.cpp reads and writes them.

For every matrix ``W (out, in)`` of the model, the imatrix holds, per input channel j,
``in_sum2[j] = sum_t x_tj^2`` over the calibration tokens t and ``counts = #tokens``; the quantizer
uses ``E[x_j^2] = in_sum2[j] / counts`` (float32 division, as ``llama-quantize`` does) to weight the
rounding error of column j.

Two files: the GGUF imatrix of current llama.cpp (``general.type = imatrix``, tensors ``<name>.in_sum2``
F32 ``[n_mat, in]`` and ``<name>.counts`` F32 ``[n_mat, 1]``, keys ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``) and the legacy ``.dat`` (int32 entry count; per entry
name length, name, ncall, nval, nval float32 of ``E[x^2] * ncall``; then optional chunk count and dataset).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from lowbit.core.errors import LowbitError


@dataclass
class Imatrix:
    """``sums[name]``: float32 (n_mat, in) sums of squares; ``counts[name]``: float32 (n_mat,) token counts."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def weights(self, name: str) -> np.ndarray | None:
        """``E[x^2]`` (in,) for tensor ``name`` as ``llama-quantize`` computes it (1 where nothing was seen)."""
        if name not in self.sums:
            return None
        s, c = self.sums[name].astype(np.float32), self.counts[name].astype(np.float32)
        out = np.ones_like(s)
        seen = c > 0
        out[seen] = s[seen] / c[seen, None]
        return out.reshape(-1)

    def names(self) -> list[str]:
        return sorted(self.sums)


def save_imatrix(im: Imatrix, path: str | Path) -> Path:
    """Write the GGUF imatrix (entries in sorted name order, as llama-imatrix does); atomic."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch="", use_temp_file=False)
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", im.datasets or ["unknown"])
    w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in im.names():
        s = np.ascontiguousarray(im.sums[name], dtype=np.float32).reshape(-1, im.sums[name].shape[-1])
        c = np.ascontiguousarray(im.counts[name], dtype=np.float32).reshape(-1, 1)
        w.add_tensor(f"{name}.in_sum2", s)
        w.add_tensor(f"{name}.counts", c)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def _load_gguf(path: Path) -> Imatrix:
    r = gguf.GGUFReader(path)
    im = Imatrix()
    f = r.fields
    if "imatrix.datasets" in f:
        im.datasets = list(f["imatrix.datasets"].contents())
    im.chunk_count = int(f["imatrix.chunk_count"].contents()) if "imatrix.chunk_count" in f else 0
    im.chunk_size = int(f["imatrix.chunk_size"].contents()) if "imatrix.chunk_size" in f else 0
    for t in r.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            im.sums[t.name.removesuffix(".in_sum2")] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(".counts"):
            im.counts[t.name.removesuffix(".counts")] = np.rint(data.reshape(-1)).astype(np.float32)
    missing = set(im.sums) ^ set(im.counts)
    if missing:
        raise LowbitError(f"imatrix {path} is damaged: sums and counts do not pair up for {sorted(missing)[:3]}")
    return im


def _load_legacy(path: Path) -> Imatrix:
    b = path.read_bytes()
    im, off = Imatrix(), 0

    def take(fmt: str) -> tuple:
        nonlocal off
        v = struct.unpack_from(fmt, b, off)
        off += struct.calcsize(fmt)
        return v

    try:
        (n,) = take("<i")
        if n < 1:
            raise ValueError("no entries")
        for _ in range(n):
            (ln,) = take("<i")
            name = b[off:off + ln].decode()
            off += ln
            ncall, nval = take("<ii")
            vals = np.frombuffer(b, dtype="<f4", count=nval, offset=off).astype(np.float32)
            off += 4 * nval
            # legacy stores E[x^2] * ncall with counts {ncall}: sums / counts gives E[x^2] again
            im.sums[name] = vals.reshape(1, -1)
            im.counts[name] = np.array([ncall], dtype=np.float32)
        if off < len(b):
            (im.chunk_count,) = take("<i")
            (ln,) = take("<i")
            if ln > 0:
                im.datasets = [b[off:off + ln].decode()]
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path} is neither a GGUF imatrix nor a legacy llama.cpp .dat imatrix ({e})") from e
    return im


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF or legacy ``.dat`` imatrix written by llama.cpp (or by :func:`save_imatrix`)."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"imatrix file {path} not found")
    with path.open("rb") as fh:
        magic = fh.read(4)
    return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
