"""llama.cpp's own quantizer, called through ctypes: the reference lowbit's GGUF encoders must match byte for byte.

llama-cpp-python ships ``libggml-base.so`` in its package folder (``llama_cpp/lib/``); it exports::

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                               int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);

``ggml_quantize_chunk`` is what ``llama-quantize`` calls per tensor (per chunk of rows per thread); its bytes
are the file's bytes. Used by the tests and by ``bench/gguf_speed.py``; other test modules import
``ggml_quantize_ref`` too.
"""

from __future__ import annotations

import ctypes
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@cache
def ggml_lib() -> ctypes.CDLL:
    """The ``libggml-base`` shared library of the installed llama-cpp-python (AssertionError when it is missing)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise AssertionError(
            "llama-cpp-python is not installed: the GGUF parity tests need its libggml-base as the reference "
            "(pip install llama-cpp-python==0.3.36, built from source on CPU-only machines)")
    libdir = Path(spec.origin).parent / "lib"
    candidates = sorted(libdir.glob("libggml-base.so*")) + sorted(libdir.glob("libggml-base.dylib"))
    if not candidates:
        raise AssertionError(f"llama-cpp-python is installed but {libdir} holds no libggml-base shared library")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` values (a multiple of the block size) in ``qtype``."""
    block, size = GGML_QUANT_SIZES[qtype]
    return n_per_row // block * size


def ggml_quantize_ref(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None,
                      threads: int = 1) -> np.ndarray:
    """``data`` float32 (n_rows, n_per_row), ``imatrix`` float32 (n_per_row,) -> uint8 (n_rows, bytes_per_row).

    Exactly what ``ggml_quantize_chunk(qtype, data, dst, 0, n_rows, n_per_row, imatrix)`` writes. With
    ``threads > 1`` the rows are split into that many contiguous chunks quantized concurrently (ctypes releases
    the GIL), as ``llama-quantize`` does; the bytes do not depend on the split.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"data must be 2-D (n_rows, n_per_row), got shape {data.shape}")
    n_rows, n_per_row = data.shape
    rb = row_bytes(qtype, n_per_row)
    out = np.zeros((n_rows, rb), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if qw is not None and qw.shape != (n_per_row,):
        raise ValueError(f"imatrix must have shape ({n_per_row},), got {qw.shape}")
    lib = ggml_lib()
    lib.ggml_quantize_init(int(qtype))
    qw_ptr = None if qw is None else qw.ctypes.data

    def run(r0: int, r1: int) -> None:
        if r1 <= r0:
            return
        done = lib.ggml_quantize_chunk(int(qtype), data.ctypes.data, out.ctypes.data, r0 * n_per_row, r1 - r0,
                                       n_per_row, qw_ptr)
        if done != (r1 - r0) * rb:
            raise AssertionError(f"ggml_quantize_chunk wrote {done} bytes, expected {(r1 - r0) * rb}")

    if threads <= 1:
        run(0, n_rows)
    else:
        bounds = np.linspace(0, n_rows, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, bounds[:-1], bounds[1:]))
    return out
