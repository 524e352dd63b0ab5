"""Model-level quantization: one entry point that runs block methods through the block-by-block engine."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import SchemeError
from lowbit.core.scheme import QuantScheme
from lowbit.models.archs import ArchSpec, block_linears, get_arch, get_blocks
from lowbit.pipeline.blockwise import BlockMethod, Part, run_blockwise
from lowbit.pipeline.registry import build_method, method_entry

log = logging.getLogger(__name__)


def named_linears(model: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Linear]]:
    """``(full name, linear)`` of every quantizable linear of every block, in order."""
    return [(f"{spec.blocks}.{i}.{n}", lin) for i, b in enumerate(get_blocks(model, spec))
            for n, lin in block_linears(b, spec, i).items()]


def check_group_size(scheme: Any, names: list[tuple[str, nn.Linear]]) -> None:
    """Refuse, before any work, a group size that does not divide some linear's input dimension."""
    if not isinstance(scheme, QuantScheme):
        return
    for name, lin in names:
        try:
            scheme.n_groups(lin.in_features)
        except SchemeError as e:
            raise SchemeError(f"{name}: {e}") from None


def quantize_model(model: nn.Module, scheme: Any, method: str | BlockMethod | list[Part] = "rtn", *,
                   tokens: torch.Tensor | None = None, device: str = "cpu",
                   scale_dtype: torch.dtype = torch.bfloat16, progress: bool = True,
                   offload_activations: bool = False) -> dict[str, Any]:
    """Quantize the decoder linears of ``model`` in place (fake-quant) and return their packed form.

    ``method`` is a method name (its default config, for ``scheme``), a ready block method, or a plan
    of :class:`~lowbit.pipeline.blockwise.Part` s (per-layer schemes and methods); ``scheme`` may be
    None with a ready method that carries its own.
    """
    spec = get_arch(model)
    if scheme is not None:
        check_group_size(scheme, named_linears(model, spec))
    if isinstance(method, str):
        if scheme is None:
            raise SchemeError(f"method {method!r} needs a scheme (e.g. W4A16)")
        method = build_method(method_entry(method).config(), scheme, scale_dtype)
    return run_blockwise(model, method, tokens, device=device, progress=progress,
                         offload_activations=offload_activations)
