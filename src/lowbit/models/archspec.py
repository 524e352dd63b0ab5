"""What an architecture table says about a decoder block: the types of :mod:`lowbit.models.archs`.

A block's quantizable linears come in groups that share one input, listed in execution order (what
GPTQ's true-sequential mode follows). Each group names ``prev``, the module whose output is that input
(a norm or a linear): AWQ and SmoothQuant divide the input by per-channel scales ``s`` inside ``prev``
and multiply the group's weight columns by ``s`` (:mod:`lowbit.pipeline.scaling`). That is exact only
where ``prev``'s output *is* the group's input, element for element:

* a norm feeding q/k/v: yes (``norm_offset`` 1 for norms computing ``x * (1 + w)``, Gemma);
* ``v_proj`` feeding ``o_proj`` through the attention: yes per channel, unless grouped-query attention
  repeats the v heads (the scaling code checks the sizes);
* a *fused* linear whose output is split before the group reads a part of it: only if the part is a
  fixed slice. ``prev_part = (i, k)`` says the group reads rows ``i`` of ``k`` equal row chunks of
  ``prev``'s output: Phi-3's ``gate_up_proj`` is ``chunk(2)``-ed and ``down_proj`` reads
  ``up * act(gate)``, so dividing the up rows (part 1 of 2) by ``s`` divides its input by ``s``.
  Phi-3's ``qkv_proj`` splits into q, k, v of sizes that depend on the head counts, so ``o_proj``'s
  group is marked ``foldable=False`` rather than folded into the wrong rows.

``inspect`` names the module whose output AWQ scores a group's scales by (default: the smallest
module holding all the group's linears; a lone fused linear is better judged by its attention or MLP).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearGroup:
    """Linears that share one input, and the module producing that input (``""``: none of the block's)."""

    prev: str
    linears: tuple[str, ...]
    foldable: bool = True  # False: scales on this input cannot be folded into ``prev`` exactly
    prev_part: tuple[int, int] | None = None  # (i, k): the input is row chunk i of k of prev's output
    inspect: str = ""  # AWQ's scoring module; "" is the smallest module holding the group


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: where the decoder blocks are and what :class:`LinearGroup` each block has.

    ``derived`` marks a table the generic fallback observed (:mod:`lowbit.models.generic`): its groups
    are right for GPTQ and RTN but carry no scale mapping, so AWQ and SmoothQuant refuse it.
    """

    name: str
    blocks: str
    groups: tuple[LinearGroup, ...]
    norm_offset: float = 0.0
    ignore: tuple[str, ...] = ("lm_head",)
    tokenwise: tuple[str, ...] = ("mlp",)
    # (attention module, its output projection) where the module returns ``(proj(z), ...)`` for the
    # projection's input z: the engine may replay the attention from saved z (lowbit.pipeline.replay)
    attn_out: tuple[str, str] | None = None
    derived: bool = False

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a block, in execution order."""
        return tuple(name for g in self.groups for name in g.linears)
