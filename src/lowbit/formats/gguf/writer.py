"""Write a GGUF file for llama.cpp from a Hugging Face folder: convert, pick tensor types, quantize, stream.

The container is the ``gguf`` package's ``GGUFWriter``; tensors are announced first (name, shape, type,
byte size), then quantized and written one at a time, so memory stays near one tensor. Tensor order and
types are llama.cpp's (``ftypes.plan_types``); the bytes of each quantized tensor are those of
``ggml_quantize_chunk`` (``encode.quantize_rows``). The file appears under its name only when complete.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import LlamaFileType

from lowbit import __version__
from lowbit.core.errors import LowbitError
from lowbit.core.io import check_replaceable_gguf, clean_stale, publish, unique_temp
from lowbit.core.scheme import QuantScheme
from lowbit.formats.gguf.convert import HFSource, add_arch_metadata, gguf_tensors
from lowbit.formats.gguf.encode import SUPPORTED, quantize_rows
from lowbit.formats.gguf.from_qweight import closest_type, direct_type, encode_direct
from lowbit.formats.gguf.ftypes import FILE_TYPES, allows_quantization, fallback, get_file_type, llama_order, plan_types
from lowbit.formats.gguf.imatrix import Imatrix
from lowbit.formats.gguf.vocab import load_vocab

log = logging.getLogger(__name__)
Q = gguf.GGMLQuantizationType


@dataclass
class GGUFReport:
    """What :func:`write_gguf` wrote."""

    path: Path
    file_type: str
    types: dict[str, str]
    fell_back: list[str]
    no_imatrix: list[str] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)  # lowbit codes written as they are (exact)
    carried_rounded: list[str] = field(default_factory=list)  # carried, float16 rounding of d / m
    requantized: list[str] = field(default_factory=list)  # lowbit-quantized, re-quantized to the file's type
    size_bytes: int = 0
    n_params: int = 0
    seconds: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_bytes / max(1, self.n_params)

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))


def _byte_shape(shape: tuple[int, ...], t: Q) -> tuple[int, ...]:
    if t in (Q.F32, Q.F16):
        return shape
    blck, size = gguf.GGML_QUANT_SIZES[t]
    return (*shape[:-1], shape[-1] // blck * size)


def _np_dtype(t: Q) -> type:
    return np.float32 if t == Q.F32 else np.float16 if t == Q.F16 else np.uint8


def plan_auto(shapes: dict[str, tuple[int, ...]], quantized: set[str], scheme: QuantScheme,
              has_g_idx: bool) -> tuple[dict[str, Q], list[str]]:
    """Types for a lowbit artifact: its quantized linears in the type closest to their scheme (the codes carried
    over when :func:`direct_type` allows), other matrices in BF16 (lowbit kept them in 16 bits), the rest F32."""
    types: dict[str, Q] = {}
    fell: list[str] = []
    target = direct_type(scheme, has_g_idx) or closest_type(scheme)
    for n, shape in shapes.items():
        if n in quantized:
            types[n], fb = fallback(target, shape[-1])
            if fb:
                fell.append(n)
        else:
            types[n] = Q.BF16 if allows_quantization(n, len(shape)) else Q.F32
    return types, fell


def plan_mixed(shapes: dict[str, tuple[int, ...]], types: dict[str, str]) -> tuple[dict[str, Q], LlamaFileType]:
    """Per-tensor types from ``types`` (GGUF name -> type name, one for every tensor llama.cpp may quantize;
    the rest F32), checked before any work, and the file type naming the mix: the stock file type whose main
    type holds the most weights (``general.file_type`` is informational in llama.cpp)."""
    out: dict[str, Q] = {}
    unknown = sorted(set(types) - set(shapes))
    if unknown:
        raise LowbitError(f"the type map names tensors this model does not have: {', '.join(unknown[:5])}")
    for n, shape in shapes.items():
        if not allows_quantization(n, len(shape)):
            if n in types:
                raise LowbitError(f"{n} is not quantized by llama.cpp (norms and 1-D tensors stay F32); drop it "
                                  "from the type map")
            out[n] = Q.F32
            continue
        if n not in types:
            raise LowbitError(f"the type map gives no type for {n}; every quantizable tensor needs one")
        key = types[n].upper()
        t = Q.__members__.get(key)
        if t is None or t not in SUPPORTED:
            raise LowbitError(f"{n}: type {types[n]!r} is not one lowbit writes; use one of "
                              f"{', '.join(sorted(x.name for x in SUPPORTED))}")
        block = gguf.GGML_QUANT_SIZES[t][0]
        if shape[-1] % block:
            raise LowbitError(f"{n}: {t.name} needs rows of a multiple of {block} values, and this tensor's rows "
                              f"have {shape[-1]}; pick a type whose block divides it (e.g. Q5_0, Q8_0)")
        out[n] = t
    weights: dict[Q, int] = {}
    for n, t in out.items():
        if t != Q.F32:
            weights[t] = weights.get(t, 0) + int(np.prod(shapes[n]))
    main = max(sorted(weights, key=lambda t: t.name), key=lambda t: weights[t]) if weights else Q.F32
    name = {Q.Q3_K: "Q3_K_M", Q.Q4_K: "Q4_K_M", Q.Q5_K: "Q5_K_M"}.get(main, main.name)
    return out, FILE_TYPES[name][0] if name in FILE_TYPES else LlamaFileType.MOSTLY_Q8_0


def write_gguf(folder: str | Path, out: str | Path, file_type: str = "Q4_K_M", *, imatrix: Imatrix | None = None,
               name: str | None = None, device: str | None = None, vocab_only: bool = False,
               progress: Callable[[int, int, str], None] | None = None,
               types: dict[str, str] | None = None) -> GGUFReport:
    """Convert the Hugging Face model in ``folder`` to GGUF ``file_type`` at ``out`` (llama.cpp's mixing rules).

    ``imatrix`` (keys: GGUF tensor names) weights the rounding of the types that use one, as llama.cpp does.
    ``vocab_only`` writes the metadata and tokenizer without tensors (llama.cpp loads it with ``vocab_only``).
    A lowbit pack-quantized artifact keeps its integer codes where the file's type holds them (see
    ``from_qweight``); ``file_type="auto"`` picks, per tensor, the type closest to the artifact's scheme.
    ``types`` (GGUF name -> type name, e.g. from :mod:`lowbit.mixed`) replaces the file type's rules with one
    type per tensor; ``file_type`` is then only the report's label. Each tensor's bytes are those llama.cpp's
    quantizer writes for its type.
    """
    t0 = time.perf_counter()
    src = HFSource(folder)
    tensors = gguf_tensors(src)
    shapes = {n: t.shape for n, t in tensors.items()}
    if types is not None:
        if src.scheme is not None:
            raise LowbitError("a per-tensor type map starts from a float checkpoint, not a quantized artifact")
        types_q, ftype = plan_mixed(shapes, types)
        fell: list[str] = []
    elif file_type.upper() == "AUTO":
        if src.scheme is None:
            raise LowbitError("--type auto is for lowbit-quantized artifacts; give a file type (e.g. Q4_K_M)")
        types_q, fell = plan_auto(shapes, {n for n, t in tensors.items() if t.qweight}, src.scheme, src.has_g_idx)
        ftype = FILE_TYPES[{Q.Q8_0: "Q8_0", Q.Q4_0: "Q4_0", Q.Q4_1: "Q4_1", Q.Q5_0: "Q5_0", Q.Q5_1: "Q5_1",
                            Q.Q2_K: "Q2_K", Q.Q3_K: "Q3_K_S", Q.Q4_K: "Q4_K_S", Q.Q5_K: "Q5_K_S",
                            Q.Q6_K: "Q6_K"}[closest_type(src.scheme)]][0]
    else:
        ftype, _ = get_file_type(file_type)
        types_q, fell = plan_types(shapes, file_type, src.shape(), has_imatrix=imatrix is not None)
    direct = direct_type(src.scheme, src.has_g_idx) if src.scheme else None
    carried: list[str] = []
    rounded: list[str] = []
    requant: list[str] = []
    out = Path(out)
    if out.is_dir():
        raise LowbitError(f"{out} is a folder; give the .gguf file path to write")
    check_replaceable_gguf(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = unique_temp(out)
    n_vocab = shapes["token_embd.weight"][0]
    w = gguf.GGUFWriter(tmp, src.spec.name, use_temp_file=False)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or Path(str(src.config.get("_name_or_path") or src.folder.name)).name)  # no machine path
        w.add_quantized_by(f"lowbit {__version__}")
        add_arch_metadata(w, src)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        load_vocab(src.folder, n_vocab).add_to(w, src.folder, n_vocab)
        order = [] if vocab_only else llama_order(list(tensors))
        for n in order:
            t = types_q[n]
            w.add_tensor_info(n, _byte_shape(shapes[n], t), np.dtype(_np_dtype(t)),
                              int(np.prod(_byte_shape(shapes[n], t))) * np.dtype(_np_dtype(t)).itemsize,
                              raw_dtype=None if t in (Q.F32, Q.F16) else t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        no_im: list[str] = []
        for i, n in enumerate(order):
            if progress:
                progress(i, len(order), n)
            t = types_q[n]
            qfn = tensors[n].qweight
            if qfn is not None and t == direct:
                tq, q, exact = encode_direct(qfn())
                (carried if exact else rounded).append(n)
                w.write_tensor_data(q.reshape(_byte_shape(shapes[n], t)))
                continue
            if qfn is not None:
                requant.append(n)
            data = tensors[n].load()
            im = None
            if imatrix is not None and t not in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):
                im = imatrix.weights(n)
                if im is None:
                    no_im.append(n)
            rows = data.reshape(-1, data.shape[-1])
            q = quantize_rows(rows, t, im, device=device) if t != Q.F32 else rows.astype(np.float32)
            q = np.ascontiguousarray(q)
            if t == Q.F16 and q.dtype == np.uint8:
                q = q.view(np.float16)
            w.write_tensor_data(q.reshape(_byte_shape(shapes[n], t)))
        w.close()
        publish(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):  # on a full disk the close's flush fails too: remove the file anyway
            w.close()
        tmp.unlink(missing_ok=True)
        raise
    n_params = sum(int(np.prod(shapes[n])) for n in order)
    rep = GGUFReport(out, file_type.upper(), {n: types_q[n].name for n in order}, fell, no_im, carried, rounded,
                     requant, out.stat().st_size, n_params, time.perf_counter() - t0)
    log.info("wrote %s: %s, %.2f bits/weight, %s", out, rep.file_type, rep.bits_per_weight, rep.type_counts())
    return rep
