"""GGUF file types (Q4_K_M, ...) and llama.cpp's per-tensor mixing rules.

A file type names a default tensor type plus rules that move some tensors up (``attn_v`` and half of
``ffn_down`` in Q4_K_M, the output matrix to Q6_K, ...) and a fallback for rows whose length the type's
block does not divide (Q4_K -> Q5_0, Q6_K -> Q8_0, ...). The rules are llama.cpp's
``llama_tensor_get_type`` (src/llama-quant.cpp), restricted to the dense, non-IQ file types, and the
tensors are visited in llama.cpp's order (layer index, then name) because the ``attn_v`` and ``ffn_down``
rules count tensors as they go.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from lowbit.core.errors import LowbitError

Q = GGMLQuantizationType

# file type name -> (llama_ftype, default tensor type)
FILE_TYPES: dict[str, tuple[LlamaFileType, Q]] = {
    "F32": (LlamaFileType.ALL_F32, Q.F32),
    "F16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "BF16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "Q4_0": (LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
    "Q4_1": (LlamaFileType.MOSTLY_Q4_1, Q.Q4_1),
    "Q5_0": (LlamaFileType.MOSTLY_Q5_0, Q.Q5_0),
    "Q5_1": (LlamaFileType.MOSTLY_Q5_1, Q.Q5_1),
    "Q2_K": (LlamaFileType.MOSTLY_Q2_K, Q.Q2_K),
    "Q3_K_S": (LlamaFileType.MOSTLY_Q3_K_S, Q.Q3_K),
    "Q3_K_M": (LlamaFileType.MOSTLY_Q3_K_M, Q.Q3_K),
    "Q3_K_L": (LlamaFileType.MOSTLY_Q3_K_L, Q.Q3_K),
    "Q4_K_S": (LlamaFileType.MOSTLY_Q4_K_S, Q.Q4_K),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
    "Q5_K_S": (LlamaFileType.MOSTLY_Q5_K_S, Q.Q5_K),
    "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
}
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_FLOAT = (Q.F32, Q.F16, Q.BF16)


def get_file_type(name: str) -> tuple[LlamaFileType, Q]:
    key = name.upper()
    if key not in FILE_TYPES:
        raise LowbitError(f"unknown GGUF file type {name!r}; use one of {', '.join(FILE_TYPES)}")
    return FILE_TYPES[key]


def llama_order(names: list[str]) -> list[str]:
    """llama.cpp's tensor order (``weight_name_comparer``): layer index (-1 outside blocks), then name."""
    def key(n: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)
    return sorted(names, key=key)


def allows_quantization(name: str, n_dims: int) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for the dense families: 2-D ``*weight``, no norms."""
    return n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name


@dataclass(frozen=True)
class ModelShape:
    """What the rules read of the model: layers, heads (for n_gqa = heads / kv heads), architecture."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    is_70b: bool = False

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(1, self.n_head_kv)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(t: Q, ncols: int) -> tuple[Q, bool]:
    """(type, fell back) for a row of ``ncols``: llama.cpp's ``tensor_type_fallback``."""
    blck = GGML_QUANT_SIZES[t][0]
    if ncols % blck == 0:
        return t, False
    new = _FALLBACK.get(t, t)
    if ncols % GGML_QUANT_SIZES[new][0] != 0:
        new = Q.F16
    return new, True


def plan_types(tensors: dict[str, tuple[int, ...]], file_type: str, model: ModelShape,
               has_imatrix: bool = False) -> tuple[dict[str, Q], list[str]]:
    """Tensor type of every tensor, as ``llama_model_quantize`` picks it from an F32 file.

    ``tensors``: GGUF name -> numpy shape (rows, cols); returns ({name: type}, names that fell back).
    Tensors that are not quantized (norms, biases, 1-D) stay F32.
    """
    ftype_id, default = get_file_type(file_type)
    ft = ftype_id.name.removeprefix("MOSTLY_").removeprefix("ALL_")
    names = llama_order(list(tensors))
    n_attn_v = sum("attn_v.weight" in n or "attn_qkv.weight" in n for n in names)
    tied = "output.weight" not in tensors
    i_v = i_down = 0
    out: dict[str, Q] = {}
    fell: list[str] = []
    for name in names:
        shape = tensors[name]
        if not allows_quantization(name, len(shape)):
            out[name] = Q.F32
            continue
        t = default
        if default in _FLOAT:
            out[name] = t
            continue
        ncols = shape[-1]
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if ncols % GGML_QUANT_SIZES[t][0] != 0:
                t = Q.Q8_0
            elif t != Q.Q8_0:
                t = Q.Q6_K
        elif name == "token_embd.weight":
            pass
        elif "attn_v.weight" in name or "attn_qkv.weight" in name:
            if ft == "Q2_K":
                t = Q.Q4_K if model.n_gqa >= 4 else Q.Q3_K
            elif ft == "Q3_K_M":
                t = Q.Q5_K if i_v < 2 else Q.Q4_K
            elif ft == "Q3_K_L":
                t = Q.Q5_K
            elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_v, n_attn_v):
                t = Q.Q6_K
            elif ft == "Q4_K_S" and i_v < 4:
                t = Q.Q5_K
            if model.is_70b and t in (Q.Q3_K, Q.Q4_K):
                t = Q.Q5_K
            i_v += 1
        elif "ffn_down" in name:
            i, n = i_down, model.n_layer
            if ft == "Q2_K":
                t = Q.Q3_K
            elif ft == "Q3_K_M":
                t = Q.Q5_K if i < n // 16 else Q.Q4_K
            elif ft == "Q3_K_L":
                t = Q.Q5_K
            elif ft == "Q4_K_M":
                if _use_more_bits(i, n):
                    t = Q.Q6_K
            elif ft == "Q5_K_M" and _use_more_bits(i, n):
                t = Q.Q6_K
            elif ft == "Q4_K_S" and i < n // 8:
                t = Q.Q5_K
            elif ft in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
                t = Q.Q4_1 if ft == "Q4_0" else Q.Q5_1
            i_down += 1
        elif "attn_output.weight" in name:
            t = {"Q2_K": Q.Q3_K, "Q3_K_M": Q.Q4_K, "Q3_K_L": Q.Q5_K}.get(ft, t)
        t, fb = fallback(t, ncols)
        if fb:
            fell.append(name)
        out[name] = t
    return out, fell
