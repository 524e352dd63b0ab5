"""Loading what lowbit writes (any artifact kind) and any model a user names, for evaluation and use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.eval.llamacpp import LlamaCppLogits
from lowbit.formats.registry import detect, load_artifact
from lowbit.models.loader import load_model


def artifact_kind(path: str | Path) -> str | None:
    """The format name of an artifact folder (:data:`lowbit.formats.registry.FORMATS`), or None."""
    f = detect(path)
    return None if f is None else f.name


def is_quantized_artifact(path: str | Path) -> bool:
    return artifact_kind(path) is not None


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, kernels: bool = True
         ) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a lowbit artifact (any kind) or any model spec, ready for inference on ``device``.

    Artifacts keep lowbit's runtime modules (what is measured is what ships); with ``kernels`` each
    integer layer runs on the fastest low-bit kernel of ``device`` (Triton on CUDA, torch's int4/int8
    packed matmuls on the CPU; :func:`lowbit.core.kernels.prepare.prepare_model`, whose per-layer report
    is logged and kept as ``model.lowbit_kernels``), the dequantized matmul where none applies.
    ``dtype`` defaults to float32 on the CPU and bfloat16 elsewhere.
    """
    from transformers import AutoTokenizer

    dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)
    if is_quantized_artifact(path):
        model = load_artifact(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path))
        if kernels:
            from lowbit.core.kernels.prepare import prepare_model

            prepare_model(model, device, dtype=dtype)
            return model, tok
    else:
        lm = load_model(str(path), device="cpu", dtype=dtype)
        model, tok = lm.model, lm.tokenizer
    return model.to(device), tok


def load_any(spec: str | Path, backend: str = "transformers", *, ctx: int = 2048, threads: int | None = None,
             tokenizer: bool = True) -> tuple[nn.Module | LlamaCppLogits, Any]:
    """(model in float32 compute, tokenizer) for an artifact folder or any model spec.

    ``backend="llamacpp"`` runs a .gguf file through llama.cpp (context ``ctx``, ``threads``) and returns
    the tokenizer transformers builds from the GGUF (None unless ``tokenizer``); by default a GGUF is
    dequantized by transformers.
    """
    if backend == "llamacpp":
        from lowbit.eval.llamacpp import load_llamacpp

        return load_llamacpp(spec, ctx, threads, tokenizer=tokenizer)
    if backend != "transformers":
        raise LowbitError(f"unknown backend {backend!r}; use transformers or llamacpp")
    # quality is scored on the artifact's exact weights in float32 (the pinned protocols), not through the
    # speed kernels, whose bf16 activations round differently (they are tested against this path)
    return load(spec, kernels=False)
