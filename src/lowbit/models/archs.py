"""Architecture tables, as data: where the decoder blocks are, which linears each block has,
in which order they run, and which module feeds each group of linears (types and folding rules in
:mod:`lowbit.models.archspec`).

One entry per architecture name (``config.architectures[0]``), never one subclass per model.
The groups are in execution order (what GPTQ's true-sequential mode follows); ``prev`` is the
module whose output is the input of every linear of the group (a norm or a linear) -- what AWQ
and SmoothQuant fold scales into. ``norm_offset`` is 1 where the norm computes ``x * (1 + w)``
(Gemma), so a scale ``s`` folds as ``w' = (1 + w) / s - 1``. ``tokenwise`` names the modules of a
block that act on each token alone (the MLP): AWQ scores them on rows drawn from every
calibration sequence instead of on whole sequences.

A model no table names gets a table derived by observation (:mod:`lowbit.models.generic`), cached per
model: enough for RTN, imatrix-RTN and GPTQ; AWQ and SmoothQuant call :func:`require_mapping` and
refuse it with the entry to write.
"""

from __future__ import annotations

import weakref

from torch import nn

from lowbit.core.errors import UnsupportedArchitectureError
from lowbit.models.archspec import ArchSpec, LinearGroup
from lowbit.models.generic import derive_spec, describe

__all__ = ["ARCHS", "ArchSpec", "LinearGroup", "arch_name", "block_linears", "get_arch", "get_blocks",
           "require_mapping"]

_ATTN = LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
_O = LinearGroup("self_attn.v_proj", ("self_attn.o_proj",))
_DOWN = LinearGroup("mlp.up_proj", ("mlp.down_proj",))

_LLAMA_LIKE = (_ATTN, _O, LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _DOWN)
_ATTN_OUT = ("self_attn", "self_attn.o_proj")

ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", "model.layers", _LLAMA_LIKE, attn_out=_ATTN_OUT),
    "MistralForCausalLM": ArchSpec("MistralForCausalLM", "model.layers", _LLAMA_LIKE, attn_out=_ATTN_OUT),
    "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM", "model.layers", _LLAMA_LIKE, attn_out=_ATTN_OUT),
    # Gemma 3: the attention output goes through post_attention_layernorm *after* o_proj, and the
    # MLP input is pre_feedforward_layernorm; RMSNorm weights are offsets from 1.
    "Gemma3ForCausalLM": ArchSpec(
        "Gemma3ForCausalLM", "model.layers",
        (_ATTN, _O, LinearGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _DOWN),
        norm_offset=1.0, attn_out=_ATTN_OUT,
    ),
    # Qwen3: Llama's linears; q_norm / k_norm (RMSNorm over each head) act on q_proj / k_proj's outputs
    # inside the attention, after the linears, so neither the groups nor a scale folded into
    # input_layernorm (which leaves q_proj's output unchanged) see them
    "Qwen3ForCausalLM": ArchSpec("Qwen3ForCausalLM", "model.layers", _LLAMA_LIKE, attn_out=_ATTN_OUT),
    # Phi-3: fused qkv_proj (q, k, v rows stacked, sizes set by the head counts) and gate_up_proj
    # (gate rows, then up rows, split by chunk(2)). o_proj reads the v part of qkv_proj, whose rows
    # the table cannot name: not foldable. down_proj reads up * act(gate): part 1 of 2 of gate_up_proj.
    # AWQ scores the fused linears by the attention's and the MLP's outputs, as AutoAWQ does.
    "Phi3ForCausalLM": ArchSpec(
        "Phi3ForCausalLM", "model.layers",
        (LinearGroup("input_layernorm", ("self_attn.qkv_proj",), inspect="self_attn"),
         LinearGroup("self_attn.qkv_proj", ("self_attn.o_proj",), foldable=False),
         LinearGroup("post_attention_layernorm", ("mlp.gate_up_proj",), inspect="mlp"),
         LinearGroup("mlp.gate_up_proj", ("mlp.down_proj",), prev_part=(1, 2))),
        attn_out=_ATTN_OUT,
    ),
}
_DERIVED: weakref.WeakKeyDictionary[nn.Module, ArchSpec] = weakref.WeakKeyDictionary()


def arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    names = getattr(cfg, "architectures", None) or []
    return names[0] if names else type(model).__name__


def get_arch(model: nn.Module) -> ArchSpec:
    """The table entry of ``model``; for an architecture no entry names, a table derived from the model
    (:func:`lowbit.models.generic.derive_spec`, once per model object: later calls return the same one)."""
    name = arch_name(model)
    spec = ARCHS.get(name) or ARCHS.get(type(model).__name__)
    if spec is not None:
        return spec
    spec = _DERIVED.get(model)
    if spec is None:
        spec = _DERIVED[model] = derive_spec(model, name)
    return spec


def require_mapping(spec: ArchSpec, method: str) -> None:
    """Refuse ``method`` (a scale-folding method: AWQ, SmoothQuant) on a derived table, naming what to add."""
    if not spec.derived:
        return
    raise UnsupportedArchitectureError(
        f"{method} needs a scale mapping for {spec.name} (the module feeding each group of linears, to fold "
        f"scales into), and no architecture table names it; lowbit derived only the groups: {describe(spec)}. "
        f"Add ArchSpec({spec.name!r}, {spec.blocks!r}, groups=(LinearGroup(prev, linears), ...)) to "
        "lowbit.models.archs.ARCHS (prev: the norm or linear whose output is the group's input; "
        "foldable=False where none is), or quantize with --method rtn, imatrix-rtn or gptq."
    )


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    try:
        blocks = model.get_submodule(spec.blocks)
    except AttributeError as e:
        raise UnsupportedArchitectureError(
            f"{spec.name}: the table says decoder blocks are at {spec.blocks!r}, but the model has no such "
            "module; its layout changed, update the ArchSpec"
        ) from e
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{spec.name}: {spec.blocks!r} is not a ModuleList")
    return blocks


def block_linears(block: nn.Module, spec: ArchSpec, index: int = 0) -> dict[str, nn.Linear]:
    """``{name within block: nn.Linear}`` in execution order; a missing linear is an error."""
    out: dict[str, nn.Linear] = {}
    for name in spec.linears:
        try:
            mod = block.get_submodule(name)
        except AttributeError as e:
            raise UnsupportedArchitectureError(
                f"{spec.name}: block {index} has no linear {name!r} listed in its architecture table"
            ) from e
        if not isinstance(mod, nn.Linear):
            raise UnsupportedArchitectureError(
                f"{spec.name}: block {index} module {name!r} is {type(mod).__name__}, expected nn.Linear"
            )
        out[name] = mod
    return out
