"""What each engine accepts, as data, and the checks that read an artifact against it.

vLLM is not installable here, so its rules are written down from its source (vLLM ``main``, late 2025:
``model_executor/layers/quantization/compressed_tensors/compressed_tensors.py`` picks a scheme per layer;
``schemes/compressed_tensors_wNa16.py``: ``WNA16_SUPPORTED_TYPES_MAP = {4: uint4b8, 8: uint8b128}`` and zero
points for 4/8 bits; ``utils/marlin_utils.py``: ``MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]``,
``GPTQ_MARLIN_MIN_THREAD_N = 64`` (output features), ``GPTQ_MARLIN_MIN_THREAD_K = 128`` (input features);
``W8A8Int8``: int8 weights per channel or tensor, int8 activations dynamic per token or static per tensor;
``W8A8Fp8`` / ``W8A16Fp8``: float8 e4m3 weights per channel, tensor or 128x128 block; fused linears
(``qkv_proj``, ``gate_up_proj``) load one scheme for all their shards). An artifact whose layers no rule
accepts is what vLLM refuses with "No compressed-tensors compatible scheme was found".
llama.cpp's rules come from ``ggml.h`` / ``gguf.cpp`` (``GGML_MAX_NAME = 64``, known tensor types, the
metadata every architecture reads) and are checked against a real load with llama-cpp-python in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: vLLM compressed-tensors, integer weight-only (WNA16 through Marlin / Machete kernels)
VLLM_WNA16_BITS = (4, 8)
VLLM_WNA16_GROUPS = (None, 32, 64, 128)  # None: per channel (Marlin's -1)
#: vLLM compressed-tensors, int8 weights and activations
VLLM_W8A8 = {"weight_strategies": ("channel", "tensor"), "act": (("token", True), ("tensor", False))}
#: vLLM compressed-tensors, float8 weights
VLLM_FP8 = {"weight_strategies": ("channel", "tensor", "block"), "block": (128, 128)}
#: linears vLLM fuses into one (the shards must share one scheme)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: llama.cpp: the longest tensor name (GGML_MAX_NAME 64, with its NUL)
LLAMACPP_MAX_NAME = 63
#: metadata llama.cpp reads for every architecture (``{arch}`` is general.architecture)
LLAMACPP_KEYS = ("general.architecture", "{arch}.context_length", "{arch}.embedding_length", "{arch}.block_count",
                 "{arch}.attention.head_count", "tokenizer.ggml.model", "tokenizer.ggml.tokens")


@dataclass(frozen=True)
class Finding:
    """One problem: where (a layer, a tensor or the file), which rule, what to do."""

    engine: str  # vllm, llamacpp, transformers, ollama, or "all" (the artifact itself)
    where: str
    rule: str
    fix: str
    fatal: bool = True  # the engine will refuse to load (False: a warning)


def _fmt(args: dict[str, Any] | None) -> str:
    if not args:
        return "16-bit"
    return f"{args.get('type', 'int')}{args.get('num_bits')} {args.get('strategy')} g{args.get('group_size')} " \
           f"{'sym' if args.get('symmetric', True) else 'asym'}"


def vllm_layer(name: str, shape: tuple[int, int] | None, group: dict[str, Any]) -> list[Finding]:
    """vLLM's scheme choice for one linear (``shape`` = (out, in)) under compressed-tensors config group ``group``."""
    w, a = group.get("weights") or {}, group.get("input_activations")
    out: list[Finding] = []
    bad = lambda rule, fix: out.append(Finding("vllm", name, rule, fix))  # noqa: E731
    kind, bits, strat = w.get("type", "int"), w.get("num_bits"), w.get("strategy")
    if kind == "float":
        if bits != 8:
            bad(f"float{bits} weights: vLLM's compressed-tensors reads float8 (or nvfp4) weights", "use FP8")
        elif strat not in VLLM_FP8["weight_strategies"]:
            bad(f"FP8 weight strategy {strat!r} is not channel, tensor or block", "use FP8 per channel or blocks")
        elif strat == "block" and tuple(w.get("block_structure") or ()) != VLLM_FP8["block"]:
            bad(f"FP8 block {w.get('block_structure')} (vLLM's block kernels take 128x128)", "use --group-size 128")
        return out
    if a is None:  # weight-only integers: WNA16
        gs = w.get("group_size") if strat == "group" else None
        if bits not in VLLM_WNA16_BITS:
            bad(f"{bits}-bit weights: vLLM's WNA16 kernels take 4 or 8 bits ('No compressed-tensors compatible "
                "scheme was found')", "quantize to W4A16 or W8A16, or serve with lowbit serve / llama.cpp (GGUF)")
        if strat not in ("group", "channel"):
            bad(f"weight strategy {strat!r}: WNA16 is per channel or per group", "use a grouped or per-channel scheme")
        if gs not in VLLM_WNA16_GROUPS:
            bad(f"group size {gs}: Marlin takes -1, 32, 64 or 128", "use --group-size 128 (or 64, 32, -1)")
        if shape is not None:
            o, i = shape
            if o % 64:  # GPTQ_MARLIN_MIN_THREAD_N
                bad(f"{o} output features: Marlin needs a multiple of 64", "keep this layer 16-bit (--ignore)")
            if i % 128 or (gs and i % gs):  # GPTQ_MARLIN_MIN_THREAD_K
                bad(f"{i} input features: Marlin needs a multiple of 128 and of the group size",
                    "keep this layer 16-bit (--ignore) or choose a group size dividing it")
        return out
    if bits != 8 or a.get("num_bits") != 8:
        bad(f"W{bits}A{a.get('num_bits')}: vLLM's integer activation schemes are W8A8", "use W8A8")
    if strat not in VLLM_W8A8["weight_strategies"] or not w.get("symmetric", True):
        bad(f"int8 weights {strat} {'sym' if w.get('symmetric', True) else 'asym'}: W8A8 weights are symmetric, "
            "per channel or tensor", "use W8A8 (per channel)")
    if (a.get("strategy"), bool(a.get("dynamic"))) not in VLLM_W8A8["act"]:
        bad(f"activations {a.get('strategy')} dynamic={a.get('dynamic')}: dynamic per token or static per tensor",
            "use W8A8 or W8A8_STATIC")
    return out


def vllm_fused(schemes: dict[str, dict[str, Any] | None]) -> list[Finding]:
    """Shards vLLM fuses (q/k/v, gate/up) must share one scheme; ``schemes``: linear name -> its config group."""
    out = []
    for name in schemes:
        parent, _, leaf = name.rpartition(".")
        for fused, shards in FUSED.items():
            if leaf != shards[0]:
                continue
            got = {s: schemes.get(f"{parent}.{s}") for s in shards if f"{parent}.{s}" in schemes}
            kinds = {_fmt((g or {}).get("weights")) + str((g or {}).get("input_activations")) for g in got.values()}
            if len(kinds) > 1:
                out.append(Finding("vllm", f"{parent}.{fused}", "its shards " + ", ".join(
                    f"{s}: {_fmt((g or {}).get('weights'))}" for s, g in got.items()) + " differ; vLLM loads one "
                    "scheme per fused linear", "give " + "/".join(shards) + " one scheme (one override for all)"))
    return out
