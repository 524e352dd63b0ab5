"""Architecture tables, as data: where the decoder blocks are, which linears each block has,
in which order they run, and which module feeds each group of linears.

One entry per architecture name (``config.architectures[0]``), never one subclass per model.
The groups are in execution order (what GPTQ's true-sequential mode follows); ``prev`` is the
module whose output is the input of every linear of the group (a norm or a linear) -- what AWQ
and SmoothQuant fold scales into. ``norm_offset`` is 1 where the norm computes ``x * (1 + w)``
(Gemma), so a scale ``s`` folds as ``w' = (1 + w) / s - 1``. ``tokenwise`` names the modules of a
block that act on each token alone (the MLP): AWQ scores them on rows drawn from every
calibration sequence instead of on whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.core.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class LinearGroup:
    """Linears that share one input, and the module producing that input."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    blocks: str
    groups: tuple[LinearGroup, ...]
    norm_offset: float = 0.0
    ignore: tuple[str, ...] = ("lm_head",)
    tokenwise: tuple[str, ...] = ("mlp",)
    # (attention module, its output projection) where the module returns ``(proj(z), ...)`` for the
    # projection's input z: the engine may replay the attention from saved z (lowbit.pipeline.replay)
    attn_out: tuple[str, str] | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a block, in execution order."""
        return tuple(name for g in self.groups for name in g.linears)


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
}


def arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    names = getattr(cfg, "architectures", None) or []
    return names[0] if names else type(model).__name__


def get_arch(model: nn.Module) -> ArchSpec:
    """The table entry of ``model``; an unknown architecture is an error naming the missing entry."""
    name = arch_name(model)
    spec = ARCHS.get(name) or ARCHS.get(type(model).__name__)
    if spec is None:
        mt = getattr(getattr(model, "config", None), "model_type", "?")
        raise UnsupportedArchitectureError(
            f"no architecture table entry for {name!r} (model_type {mt!r}): lowbit.models.archs.ARCHS "
            f"has {', '.join(sorted(ARCHS))}. Add an ArchSpec for {name!r} (blocks path, linear groups "
            "in execution order, the module feeding each group) to support it."
        )
    return spec


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
