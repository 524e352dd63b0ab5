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
from lowbit.core.io import check_replaceable_gguf, clean_stale, publish, unique_temp


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
    check_replaceable_gguf(path)
    clean_stale(path)
    tmp = unique_temp(path)
    try:
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
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _bad(path: Path, what: str) -> LowbitError:
    return LowbitError(f"imatrix {path} is damaged: {what}. Fix: compute it again (lowbit imatrix) or pass "
                       "another --imatrix")


def _load_gguf(path: Path) -> Imatrix:
    """The GGUF imatrix; its header is bounds-checked (:mod:`lowbit.models.gguf_header`) before any read."""
    from lowbit.core.errors import ModelLoadError
    from lowbit.models.gguf_header import read_header

    try:
        h = read_header(path)
    except ModelLoadError as e:
        raise LowbitError(f"imatrix {e}") from None
    f, im = h.fields, Imatrix()
    ds = f.get("imatrix.datasets", [])
    im.datasets = [str(x) for x in ds] if isinstance(ds, list) else [str(ds)]
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        v = f.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _bad(path, f"{key} is {v!r}, not a count")
        setattr(im, attr, v)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    for t in h.tensors:
        if t.ggml_type != 0:  # GGML_TYPE_F32
            raise _bad(path, f"tensor {t.name} has ggml type {t.ggml_type}; an imatrix holds F32 tensors")
        data = np.frombuffer(raw, dtype="<f4", count=t.nbytes // 4, offset=t.offset).astype(np.float32)
        if not np.isfinite(data).all() or (data < 0).any():
            raise _bad(path, f"tensor {t.name} holds negative, NaN or infinite values (sums of squares and "
                             "counts are finite and >= 0)")
        if t.shape[0] < 1 or data.size % t.shape[0]:
            raise _bad(path, f"tensor {t.name} has shape {list(t.shape)}")
        if t.name.endswith(".in_sum2"):
            im.sums[t.name.removesuffix(".in_sum2")] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(".counts"):
            im.counts[t.name.removesuffix(".counts")] = np.rint(data.reshape(-1)).astype(np.float32)
    missing = set(im.sums) ^ set(im.counts)
    if missing:
        raise _bad(path, f"sums and counts do not pair up for {sorted(missing)[:3]}")
    for name, s in im.sums.items():
        if im.counts[name].shape[0] != s.shape[0]:
            raise _bad(path, f"{name} has {s.shape[0]} rows of sums but {im.counts[name].shape[0]} counts")
    return im


def _load_legacy(path: Path) -> Imatrix:
    """llama.cpp's legacy ``.dat``; every count is checked against the bytes left before it is used."""
    b = path.read_bytes()
    im, off = Imatrix(), 0

    def take(fmt: str) -> tuple:
        nonlocal off
        v = struct.unpack_from(fmt, b, off)
        off += struct.calcsize(fmt)
        return v

    def count(v: int, size: int, what: str) -> int:
        if v < 0 or off + v * size > len(b):
            raise ValueError(f"{what} {v} does not fit the {len(b) - off} bytes left")
        return v

    try:
        (n,) = take("<i")
        if n < 1 or 4 + 12 * n > len(b):  # each entry: name length, ncall, nval (3 x int32) at least
            raise ValueError(f"entry count {n} does not fit a {len(b)}-byte file")
        for _ in range(n):
            (ln,) = take("<i")
            name = b[off:off + count(ln, 1, "name length")].decode()
            off += ln
            ncall, nval = take("<ii")
            if ncall < 0:
                raise ValueError(f"{name}: negative call count {ncall}")
            vals = np.frombuffer(b, dtype="<f4", count=count(nval, 4, f"{name}: value count"), offset=off)
            off += 4 * nval
            if not np.isfinite(vals).all() or (vals < 0).any():
                raise ValueError(f"{name}: negative, NaN or infinite sums of squares")
            # legacy stores E[x^2] * ncall with counts {ncall}: sums / counts gives E[x^2] again
            im.sums[name] = vals.astype(np.float32).reshape(1, -1)
            im.counts[name] = np.array([ncall], dtype=np.float32)
        if off < len(b):
            (im.chunk_count,) = take("<i")
            (ln,) = take("<i")
            if ln > 0:
                im.datasets = [b[off:off + count(ln, 1, "dataset name length")].decode()]
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
