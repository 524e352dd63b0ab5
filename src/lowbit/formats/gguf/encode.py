"""Encode float32 rows into GGUF tensor bytes, byte-identical to llama.cpp's ``ggml_quantize_chunk``.

``quantize_rows(data, qtype, imatrix)`` returns exactly what ``ggml_quantize_chunk(qtype, data, dst, 0,
n_rows, n_per_row, imatrix)`` writes (llama-cpp-python 0.3.36's ggml; the tests compare byte for byte).
The block quantizers (``legacy``, ``kquants``, ``kquants_low``) are vectorised over blocks: numpy arrays
on the CPU (chunks of rows spread over the cores by ``cpu_pool``), torch tensors on ``device="cuda"``
(or any other torch device), in larger chunks.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.core.errors import SchemeError
from lowbit.formats.gguf.cpu_pool import POOL_MIN_VALUES, Encoder, run_chunks
from lowbit.formats.gguf.kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k
from lowbit.formats.gguf.kquants_low import quantize_q2_k, quantize_q3_k
from lowbit.formats.gguf.legacy import quantize_q4_0, quantize_q4_1, quantize_q5_0, quantize_q5_1, quantize_q8_0

T = GGMLQuantizationType

_ENCODERS: dict[GGMLQuantizationType, Encoder] = {
    T.Q4_0: quantize_q4_0, T.Q4_1: quantize_q4_1, T.Q5_0: quantize_q5_0, T.Q5_1: quantize_q5_1,
    T.Q8_0: quantize_q8_0, T.Q2_K: quantize_q2_k, T.Q3_K: quantize_q3_k, T.Q4_K: quantize_q4_k,
    T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k,
}
SUPPORTED: frozenset[GGMLQuantizationType] = frozenset({T.F32, T.F16, T.BF16, *_ENCODERS})

# values per chunk: large enough that the per-call cost of numpy is small against the array work, small
# enough that a search's working set (about 10 arrays of the chunk's size) stays in the last-level cache;
# 2**18 was the fastest on 2 cores (AMD EPYC) for Q4_K and Q6_K
_CPU_CHUNK = 1 << 18
_DEVICE_CHUNK = 1 << 24
# the legacy types without an imatrix make a few passes per value: the pool's fixed cost (copying the rows
# to the workers) only pays off on large tensors
_SIMPLE_POOL_MIN_VALUES = 1 << 25


def _fallback_note(qtype: GGMLQuantizationType) -> str:
    """What llama.cpp's ``tensor_type_fallback`` does with a tensor whose rows do not fit ``qtype``'s blocks."""
    fallback = {T.Q2_K: "Q4_0", T.Q3_K: "Q4_0", T.Q4_K: "Q5_0", T.Q5_K: "Q5_1", T.Q6_K: "Q8_0"}.get(qtype)
    if fallback is None:
        return "llama.cpp falls back to F16 for such tensors"
    return (f"llama.cpp falls back to another type for such tensors ({qtype.name} -> {fallback}, "
            "or F16 when the row length is not a multiple of 32 either)")


def _check(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None) -> None:
    if qtype not in SUPPORTED:
        names = ", ".join(sorted(t.name for t in SUPPORTED))
        raise SchemeError(f"GGUF type {qtype.name} is not supported by lowbit's encoder (supported: {names})")
    if data.ndim != 2:
        raise SchemeError(f"quantize_rows needs 2-D data (n_rows, n_per_row), got shape {data.shape}")
    block = GGML_QUANT_SIZES[qtype][0]
    if data.shape[1] % block:
        raise SchemeError(
            f"{qtype.name} needs rows whose length is a multiple of {block}, got n_per_row={data.shape[1]}; "
            f"{_fallback_note(qtype)}")
    if imatrix is not None and imatrix.shape != (data.shape[1],):
        raise SchemeError(f"imatrix must have shape ({data.shape[1]},) (one value per input column), "
                          f"got {imatrix.shape}")
    if qtype not in (T.F32, T.F16, T.BF16) and not np.isfinite(data).all():
        raise SchemeError(f"{qtype.name}: the data holds NaN or inf; llama.cpp's quantizers assume finite values")


def _fp16(data: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even; NaN -> sign | 0x7e00)."""
    with np.errstate(over="ignore"):  # beyond 65504 -> inf, as ggml
        h = data.astype(np.float16).view(np.uint16)
    sign = (data.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
    return np.where(np.isnan(data), sign | np.uint16(0x7E00), h).astype(np.uint16)


def _bf16(data: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even; NaN -> its upper half | 64 (quiet)."""
    u = data.view(np.uint32).astype(np.uint64)
    rne = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 64, rne).astype(np.uint16)


def quantize_rows(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None,
                  device: str | None = None, workers: int | None = None) -> np.ndarray:
    """``data`` float32 ``(n_rows, n_per_row)``, ``imatrix`` float32 ``(n_per_row,)`` or None ->
    uint8 ``(n_rows, bytes_per_row)``: exactly the bytes of ``ggml_quantize_chunk(qtype, data, ..., imatrix)``.

    ``bytes_per_row = n_per_row / block_size * type_size`` (``gguf.GGML_QUANT_SIZES``). Types with an
    ``_impl`` path use ``imatrix`` (Q8_0, F16, BF16 and F32 ignore it, as llama.cpp). ``device`` is a torch
    device for the block searches (default: CPU, with numpy); the result is the same bytes on every device.
    Raises ``SchemeError`` (a ValueError) for an unsupported type, a row length that is not a multiple of
    the block size, a wrongly shaped imatrix or non-finite data in a quantized type.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    qtype = GGMLQuantizationType(qtype)
    qw_np = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    _check(data, qtype, qw_np)
    n_rows, n_per_row = data.shape
    if qtype == T.F32:
        return data.view(np.uint8).reshape(n_rows, -1).copy()
    if qtype == T.F16:
        return _fp16(data).view(np.uint8).reshape(n_rows, -1)
    if qtype == T.BF16:
        return _bf16(data).view(np.uint8).reshape(n_rows, -1)
    encoder = _ENCODERS[qtype]
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.empty((n_rows, n_per_row // block * size), dtype=np.uint8)
    qw = None if qtype == T.Q8_0 else qw_np
    on_cpu = device is None or torch.device(device).type == "cpu"
    simple = qw is None and qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
    step = max(1, (_CPU_CHUNK if on_cpu else _DEVICE_CHUNK) // n_per_row)
    if on_cpu:
        run_chunks(encoder, data, qw, out, step, workers or os.cpu_count() or 1,
                   pool_min_values=_SIMPLE_POOL_MIN_VALUES if simple else POOL_MIN_VALUES)
        return out
    starts = range(0, n_rows, step)
    dev = torch.device(device or "cpu")
    qw_t = None if qw is None else torch.from_numpy(qw).to(dev)
    with torch.no_grad():
        for r0 in starts:
            out[r0:r0 + step] = encoder(torch.from_numpy(data[r0:r0 + step]).to(dev), qw_t).cpu().numpy()
    return out
