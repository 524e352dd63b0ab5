"""Hugging Face causal LM folder -> GGUF tensors and metadata, for the Llama, Mistral, Qwen2, Qwen3 and Gemma3 families.

What llama.cpp's ``convert_hf_to_gguf.py`` does for these families, written as data:

* tensor names through the ``gguf`` package's name maps (``model.layers.3.self_attn.q_proj.weight`` ->
  ``blk.3.attn_q.weight``);
* Llama/Mistral: ``q_proj``/``k_proj`` rows permuted from Hugging Face's rotate-half RoPE layout to
  llama.cpp's interleaved one: ``W.reshape(h, 2, d/2, n).swapaxes(1, 2).reshape(h*d, n)`` (h = heads of
  that projection, d = head dim);
* Qwen3: Qwen2's layout (no permutation) plus the per-head RMSNorms of q and k, ``attn_q_norm`` / ``attn_k_norm``
  (``head_dim`` weights each; Qwen3's ``head_dim`` is set apart from ``hidden_size / heads``, so the key and
  value lengths are written);
* Gemma3: RMSNorm computes ``x * (1 + w)``, llama.cpp ``x * w``: norm weights get ``+1`` (in float32, so the
  stored weight is exactly what transformers multiplies by);
* Llama 3 RoPE scaling: the ``rope_freqs`` factors tensor;
* tied embeddings: no ``output.weight`` (llama.cpp reuses ``token_embd``).

Tensors are read lazily, one at a time (safetensors, memory-mapped), so converting needs about one tensor
of memory beyond the output.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lowbit.core.errors import LowbitError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.formats.gguf.ftypes import ModelShape

A = gguf.MODEL_ARCH
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face architecture maps onto a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_shift: float = 0.0

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(A.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec(A.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(A.QWEN2),
    "Qwen3ForCausalLM": ArchSpec(A.QWEN3),
    "Gemma3ForCausalLM": ArchSpec(A.GEMMA3, norm_shift=1.0),
}

TensorFn = Callable[[], np.ndarray]
_QPARTS = (".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF file: numpy shape, float32 loader, and for artifacts the integer codes."""

    shape: tuple[int, ...]
    load: TensorFn
    qweight: Callable[[], QuantizedWeight] | None = None


class HFSource:
    """A Hugging Face folder: ``config.json`` and (sharded) safetensors, read one tensor at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise LowbitError(f"{self.folder} has no config.json: not a Hugging Face model folder")
        self.config: dict[str, Any] = json.loads(cfg.read_text())
        if "text_config" in self.config:
            self.config = {**self.config, **self.config["text_config"]}
        idx = self.folder / "model.safetensors.index.json"
        if idx.is_file():
            wmap = json.loads(idx.read_text())["weight_map"]
            self.files = {k: self.folder / v for k, v in wmap.items()}
        elif (self.folder / "model.safetensors").is_file():
            from safetensors import safe_open

            f = self.folder / "model.safetensors"
            with safe_open(str(f), "pt") as h:
                self.files = {k: f for k in h.keys()}  # noqa: SIM118 (safe_open is not a dict)
        else:
            raise LowbitError(f"{self.folder} has no safetensors weights (model.safetensors or its index)")
        self.scheme: QuantScheme | None = None  # a lowbit pack-quantized artifact: the scheme of its linears
        qc = self.config.get("quantization_config")
        if qc:
            if qc.get("quant_method") != "compressed-tensors":
                raise LowbitError(f"{self.folder} is quantized with {qc.get('quant_method')!r}; GGUF export reads "
                                  f"float checkpoints and lowbit's integer (pack-quantized) artifacts")
            from lowbit.formats.compressed_tensors import read_scheme

            self.scheme, _ = read_scheme(self.config)
            self.has_g_idx = any(k.endswith(".weight_g_idx") for k in self.files)
        archs = self.config.get("architectures") or []
        known = [a for a in archs if a in ARCHS]
        if not known:
            raise LowbitError(f"architecture {archs} has no GGUF mapping; supported: {', '.join(ARCHS)}")
        self.spec = ARCHS[known[0]]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as h:
            return h.get_tensor(name)

    def qweight(self, linear: str) -> QuantizedWeight:
        """The integer codes of one quantized linear of an artifact (``linear``: module name)."""
        from lowbit.formats.compressed_tensors import unpack_tensors

        assert self.scheme is not None
        keys = [k for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
                if f"{linear}.{k}" in self.files]
        return unpack_tensors(linear, {f"{linear}.{k}": self.get(f"{linear}.{k}") for k in keys}, self.scheme)

    def hp(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if self.config.get(k) is not None:
                return self.config[k]
        return default

    @property
    def head_dim(self) -> int:
        return int(self.hp("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"])

    def shape(self) -> ModelShape:
        n_layer = int(self.config["num_hidden_layers"])
        return ModelShape(self.spec.name, n_layer, int(self.config["num_attention_heads"]),
                          int(self.hp("num_key_value_heads", "num_attention_heads")),
                          is_70b=self.spec.arch == A.LLAMA and n_layer == 80)

    def rope(self) -> dict[str, Any]:
        r = self.hp("rope_parameters", "rope_scaling") or {}
        if "rope_theta" not in r and "full_attention" not in r and self.config.get("rope_theta") is not None:
            r = {**r, "rope_theta": self.config["rope_theta"]}
        return r


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(src: HFSource, rp: dict[str, Any]) -> np.ndarray:
    base, dim = rp.get("rope_theta", 10000.0), src.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def gguf_tensors(src: HFSource) -> dict[str, GGUFTensor]:
    """GGUF name -> tensor for every tensor llama.cpp needs (artifacts: quantized linears dequantized, and
    their codes, with the same row permutation)."""
    spec, cfg = src.spec, src.config
    n_layer = int(cfg["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(spec.arch, n_layer)
    tied = bool(cfg.get("tie_word_embeddings", spec.arch == A.GEMMA3))
    n_head, n_kv = src.shape().n_head, src.shape().n_head_kv
    out: dict[str, GGUFTensor] = {}
    for key in src.files:
        if key.endswith(("rotary_emb.inv_freq", "attention.masked_bias", "attention.bias", *_QPARTS)):
            continue
        packed = key.endswith(".weight_packed")
        hf = key.removesuffix("_packed")
        if tied and hf == "lm_head.weight":
            continue
        name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"tensor {hf} of {src.folder} has no llama.cpp name for {spec.name}: "
                              f"this checkpoint has parts the GGUF architecture cannot hold")

        heads = n_head if hf.endswith("q_proj.weight") else n_kv if hf.endswith("k_proj.weight") else 0
        heads = heads if spec.permute_qk else 0

        def qweight(hf: str = hf, heads: int = heads) -> QuantizedWeight:
            qw = src.qweight(hf.removesuffix(".weight"))
            if heads:
                qw = QuantizedWeight(_permute(qw.codes, heads), _permute(qw.scales, heads),
                                     _permute(qw.zeros, heads), qw.scheme, qw.g_idx)
            return qw

        def load(key: str = key, name: str = name, heads: int = heads, packed: bool = packed,
                 qw_fn: Callable[[], QuantizedWeight] = qweight) -> np.ndarray:
            if packed:
                return qw_fn().dequantize(torch.float32).numpy()
            t = src.get(key).to(torch.float32)
            if heads:
                t = _permute(t, heads)
            if spec.norm_shift and name.endswith("norm.weight"):
                t = t + spec.norm_shift
            return t.contiguous().numpy()

        if packed:
            shape = tuple(int(v) for v in src.get(hf + "_shape").tolist())
        else:
            from safetensors import safe_open

            with safe_open(str(src.files[key]), "pt") as h:
                shape = tuple(h.get_slice(key).get_shape())
        out[name] = GGUFTensor(shape, load, qweight if packed else None)
    rp = src.rope()
    rp = rp.get("full_attention", rp)
    if spec.arch == A.LLAMA and str(rp.get("rope_type", "")).lower() == "llama3":
        factors = _llama3_rope_factors(src, rp)
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = GGUFTensor(factors.shape, lambda: factors)
    return out


def add_arch_metadata(w: gguf.GGUFWriter, src: HFSource) -> None:
    """Architecture keys (``<arch>.context_length`` ...), as llama.cpp's converter writes them."""
    cfg, spec = src.config, src.spec
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_context_length(int(src.hp("max_position_embeddings", default=131072 if spec.arch == A.GEMMA3 else 4096)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(src.hp("num_key_value_heads", "num_attention_heads")))
    w.add_layer_norm_rms_eps(float(src.hp("rms_norm_eps", default=1e-6)))
    rope = src.rope()
    full = rope.get("full_attention", rope)
    w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0 if spec.arch == A.GEMMA3 else 10000.0)))
    if (swa_theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(float(swa_theta))
    kind, factor = full.get("rope_type", full.get("type")), full.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
    elif kind not in (None, "default", "llama3"):
        raise LowbitError(f"RoPE scaling {kind!r} is not supported for GGUF export (linear, yarn, llama3 are)")
    if src.hp("head_dim") is not None or spec.arch == A.GEMMA3:
        w.add_key_length(src.head_dim)
        w.add_value_length(src.head_dim)
    if spec.arch == A.LLAMA:
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_rope_dimension_count(src.head_dim)
    if spec.arch == A.GEMMA3:
        qpas = cfg.get("query_pre_attn_scalar")
        if qpas is not None and qpas not in (src.head_dim, cfg["hidden_size"] // cfg["num_attention_heads"]):
            log.warning("query_pre_attn_scalar=%s differs from head_dim=%d: llama.cpp scales attention by "
                        "1/sqrt(head_dim) for Gemma 3, so its outputs will differ from transformers'", qpas,
                        src.head_dim)
        if (cap := cfg.get("final_logit_softcapping")):
            w.add_final_logit_softcapping(float(cap))
        if cfg.get("sliding_window_pattern") != 1 and cfg.get("sliding_window"):
            w.add_sliding_window(int(cfg["sliding_window"]))
