"""A bounds-checked reader of a GGUF file's header: every count and size is checked against the bytes
that are left before anything is read or allocated, so a crafted file costs at most one pass over
itself and ends in :class:`~lowbit.core.errors.ModelLoadError`.

Layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x      key: string | type u32 | value        string = len u64 + UTF-8 bytes
                value: u8 i8 u16 i16 u32 i32 f32 bool string array u64 i64 f64 (types 0..12)
                array = elem type u32 + count u64 + count values (arrays of arrays are refused)
    n_tensors x name: string | n_dims u32 (<= 4) | dims u64[n_dims] | ggml type u32 | offset u64
    padding to general.alignment (default 32), then the tensor data; each tensor's offset is aligned
    and its bytes (dims, type's block and byte size) lie inside the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.core.errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY = 65535


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (the row length) first
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, Any] = field(default_factory=dict)  # key -> value (arrays as lists)
    types: dict[str, int] = field(default_factory=dict)  # key -> value type (arrays: (9, elem type))
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.off, self.end, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"GGUF file {self.path} is corrupt or truncated: {what} (at byte {self.off}). "
                              "Fix: re-download or re-export the file.")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > self.end:
            raise self.fail(f"{what} needs {n} bytes, {self.end - self.off} are left")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.off)[0]
        self.off += n
        return v

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("<Q", f"{what} length")
        if limit is not None and n > limit:
            raise self.fail(f"{what} of {n} bytes (at most {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.off:self.off + n])
        self.off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e.reason})") from None

    def value(self, vtype: int, what: str, in_array: bool = False) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY and not in_array:
            etype = self.unpack("<I", f"{what} element type")
            count = self.unpack("<Q", f"{what} element count")
            least = 8 if etype == STRING else struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else None
            if least is None:
                raise self.fail(f"{what}: array of type {etype} (arrays hold scalars or strings)")
            self.need(count * least, f"{what} ({count} elements)")
            if etype == STRING:
                return [self.string(what) for _ in range(count)]
            fmt = _SCALARS[etype]
            vals = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.off))
            self.off += count * least
            return vals
        raise self.fail(f"{what}: unknown value type {vtype}")


def _type_sizes() -> dict[int, tuple[int, int]]:
    import gguf

    return {int(t): (int(b), int(s)) for t, (b, s) in gguf.GGML_QUANT_SIZES.items()}


def read_header(path: str | Path) -> GGUFHeader:
    """The checked header of the GGUF file ``path`` (tensor data is not read, only bounds-checked)."""
    p = Path(path)
    with open(p, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            magic = f.seek(0) == 0 and f.read(4)
            if magic != b"GGUF":
                raise ModelLoadError(f"{p} is not a GGUF file (magic {magic!r}, expected b'GGUF'). "
                                     "Fix: pass a real .gguf file, or a folder with config.json.")
            raise ModelLoadError(f"GGUF file {p} is truncated ({size} bytes). Fix: re-download or re-export it.")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, p), size)


def _parse(c: _Cursor, size: int) -> GGUFHeader:
    magic = bytes(c.buf[:4])
    if magic != b"GGUF":
        raise ModelLoadError(f"{c.path} is not a GGUF file (magic {magic!r}, expected b'GGUF'). "
                             "Fix: pass a real .gguf file, or a folder with config.json.")
    c.off = 4
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        raise c.fail(f"version {version} (lowbit reads GGUF v2 and v3)")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "key-value count")
    c.need(n_kv * 12, f"{n_kv} key-value pairs")  # each: key length u64 + type u32 at least
    h = GGUFHeader(version)
    for i in range(n_kv):
        key = c.string(f"key {i}", MAX_KEY)
        if key in h.fields:
            raise c.fail(f"key {key!r} appears twice")
        vtype = c.unpack("<I", f"type of {key}")
        h.fields[key] = c.value(vtype, key)
        h.types[key] = vtype
    c.need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length, n_dims, type, offset at least
    align = h.fields.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1) or align > 1 << 20:
        raise c.fail(f"general.alignment {align!r} is not a power of two")
    sizes = _type_sizes()
    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor {i} name", MAX_KEY)
        nd = c.unpack("<I", f"{name} n_dims")
        if not 1 <= nd <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {nd} dimensions (1 to {MAX_DIMS})")
        c.need(8 * nd, f"{name} dims")
        dims = struct.unpack_from(f"<{nd}Q", c.buf, c.off)
        c.off += 8 * nd
        t = c.unpack("<I", f"{name} type")
        if t not in sizes:
            raise c.fail(f"tensor {name!r} has unknown ggml type {t}")
        off = c.unpack("<Q", f"{name} offset")
        block, tsize = sizes[t]
        n = 1
        for d in dims:
            n *= d
        if max(dims) >= 1 << 62 or n >= 1 << 62 or dims[0] % block or n > size * max(block, 1):
            raise c.fail(f"tensor {name!r} shape {list(dims)} does not fit type {t} (block {block}) in the file")
        infos.append((name, tuple(int(d) for d in dims), t, off, n // block * tsize))
    data = -(-c.off // align) * align
    h.data_offset = data
    seen: set[str] = set()
    for name, dims, t, off, nbytes in infos:
        if name in seen:
            raise c.fail(f"tensor {name!r} appears twice")
        seen.add(name)
        if off % align or data + off + nbytes > size:
            raise c.fail(f"tensor {name!r} data [{data + off}, {data + off + nbytes}) is unaligned or past the end "
                         f"of the file ({size} bytes): the file is truncated")
        h.tensors.append(TensorInfo(name, dims, t, data + off, nbytes))
    return h
