"""Which tensors a budget is spent on, per artifact family, and the bytes of everything else.

- ``int`` (compressed-tensors): every quantizable linear of the decoder blocks (the architecture table's),
  keyed by module name. Linears sharing an input (q/k/v, gate/up) form one *unit*: vLLM fuses them into one
  matrix with one scheme. Everything else (embeddings, norms, an untied head) stays in the storage dtype.
- ``gguf`` (llama.cpp): every tensor llama.cpp may quantize (2-D weights, no norms:
  ``ftypes.allows_quantization``), keyed by GGUF name, each its own unit; the token embedding is one of them
  (with tied embeddings it is also the output head). Norms and other 1-D tensors stay F32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.formats.gguf.convert import HFSource, gguf_tensors
from lowbit.formats.gguf.ftypes import allows_quantization, llama_order
from lowbit.models.archs import get_arch
from lowbit.pipeline.quantize import named_linears


@dataclass(frozen=True)
class TensorEntry:
    """One tensor the budget is spent on: its key, the module holding it, shape ``(rows, cols)``, and its unit."""

    name: str
    module: str
    shape: tuple[int, int]
    unit: str

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def int_entries(model: nn.Module, dtype_bytes: int = 2) -> tuple[list[TensorEntry], int, int]:
    """(block linears of ``model``, bytes and values of the unquantized rest in ``dtype_bytes`` per value); a
    linear's ``unit`` is the group sharing its input (``model.layers.0:self_attn.q_proj+self_attn.k_proj+...``)."""
    spec = get_arch(model)
    out = []
    for name, lin in named_linears(model, spec):
        prefix, local = name[: len(spec.blocks)], name[len(spec.blocks) + 1:]
        idx, rel = local.split(".", 1)
        group = next(g for g in spec.groups if rel in g.linears)
        unit = f"{prefix}.{idx}:" + "+".join(group.linears)
        out.append(TensorEntry(name, name, (lin.out_features, lin.in_features), unit))
    nbytes, values = _rest(model, {e.module + ".weight" for e in out}, dtype_bytes)
    return out, nbytes, values


def _rest(model: nn.Module, chosen: set[str], dtype_bytes: int) -> tuple[int, int]:
    """(bytes, values) of every floating parameter and buffer outside ``chosen`` (each tensor once)."""
    seen: set[int] = set()
    nbytes = values = 0
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if n in chosen or id(p) in seen or not p.is_floating_point() or n.endswith("inv_freq"):
            continue
        seen.add(id(p))
        nbytes += p.numel() * dtype_bytes
        values += p.numel()
    return nbytes, values


def hf_to_gguf(src: HFSource) -> dict[str, str]:
    """HF tensor key (``model.layers.0.self_attn.q_proj.weight``) -> GGUF name, for what :func:`gguf_tensors`
    writes (a tied head is not written: ``token_embd`` serves)."""
    n_layer = int(src.config["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(src.spec.arch, n_layer)
    out = {}
    for key in src.files:
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is not None:
            out[key] = name
    return out


def gguf_entries(folder: str | Path) -> tuple[list[TensorEntry], int, int, bool]:
    """(quantizable tensors in llama.cpp's order, bytes and values of the F32 rest, tied embeddings)."""
    src = HFSource(folder)
    if src.scheme is not None:
        raise LowbitError(f"{folder} is a quantized artifact; mixed GGUF types start from a float checkpoint")
    tensors = gguf_tensors(src)
    back = {g: k.removesuffix(".weight") for k, g in hf_to_gguf(src).items()}
    tied = "output.weight" not in tensors
    entries, fixed, values = [], 0, 0
    for name in llama_order(list(tensors)):
        shape = tensors[name].shape
        if allows_quantization(name, len(shape)):
            if name not in back:
                raise LowbitError(f"GGUF tensor {name} has no Hugging Face module to read")
            entries.append(TensorEntry(name, back[name], (int(shape[0]), int(shape[1])), name))
        else:
            fixed += -(-4 * int(np.prod(shape)) // 32) * 32  # F32, padded to GGUF's 32-byte alignment
            values += int(np.prod(shape))
    return entries, fixed, values, tied
