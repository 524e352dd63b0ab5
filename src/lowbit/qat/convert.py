"""``convert``: a trained fake-quant model out as an artifact, through the exporters ``lowbit quantize`` uses.

Each :class:`~lowbit.qat.fakequant.FakeQuantLinear` gives the codes, scales and zero points of its
forward pass (:meth:`~lowbit.qat.fakequant.FakeQuantLinear.qweight`), and the format registry writes
them with the model's other tensors (already rounded to the storage dtype by :func:`lowbit.qat.prepare`):
the artifact computes what the fake-quant model computed. ``format="gguf"`` writes a llama.cpp file
where the scheme maps onto a GGUF type that holds its codes as they are (4/5/8-bit, group 32:
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); other schemes are refused rather than re-quantized, which would
discard what training learned.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.qweight import QuantizedWeight
from lowbit.formats.hf_folder import RECIPE_FILE
from lowbit.formats.registry import SaveRequest, format_for
from lowbit.qat.prepare import fake_quant_layers, qat_state

log = logging.getLogger(__name__)

FORMATS = ("auto", "compressed-tensors", "gguf")


def qweights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """``{full name: QuantizedWeight}`` of every fake-quant linear, as its forward pass quantizes it now."""
    return {n: m.qweight() for n, m in fake_quant_layers(model).items()}


def check_gguf(model: nn.Module) -> None:
    """Refuse a GGUF export whose scheme has no GGUF type that carries its codes."""
    from lowbit.formats.gguf.from_qweight import direct_type

    schemes = {m.scheme.with_options(name=None) for m in fake_quant_layers(model).values()}
    for s in schemes:
        if direct_type(s) is None:
            raise LowbitError(f"{s.label} has no GGUF type that holds its codes as they are (GGUF carries 4, 5 and "
                              "8 bits in groups of 32: W4A16 --group-size 32 and the like); re-quantizing would lose "
                              "what QAT learned. Export compressed-tensors instead")
    if len(schemes) > 1:
        raise LowbitError("a GGUF export holds one scheme; this model has per-layer schemes")


def convert(model: nn.Module, out: str | Path, *, tokenizer: Any = None, format: str = "auto",
            record: dict[str, Any] | None = None, files: dict[str, str] | None = None, force: bool = False) -> Path:
    """Write the prepared (and trained) ``model`` as an artifact at ``out``; returns the path written.

    ``format``: ``auto``/``compressed-tensors`` (a folder vLLM and transformers load) or ``gguf`` (a file
    llama.cpp loads; see the module docstring). ``record`` is the provenance record, ``files`` more text
    files for the folder (the recipe is always written as ``recipe.yaml``).
    """
    if format not in FORMATS:
        raise LowbitError(f"unknown QAT export format {format!r}; use one of {FORMATS}")
    st = qat_state(model)
    weights = qweights(model)
    if not weights:
        raise LowbitError("the model has no fake-quant layers left to export")
    scheme = next(iter(weights.values())).scheme
    was_training = model.training
    model.eval()
    try:
        if format == "gguf":
            return _convert_gguf(model, weights, Path(out), tokenizer, record, files, force)
        fmt = format_for(scheme, "compressed-tensors")
        all_files = {RECIPE_FILE: st.recipe.to_yaml(), **(files or {})}
        fmt.save(SaveRequest(model, weights, Path(out), scheme, st.scale_dtype, tokenizer, force, record or {},
                             all_files, actorder=st.actorder))
    finally:
        model.train(was_training)
    log.info("QAT artifact written to %s (%d quantized linears)", out, len(weights))
    return Path(out)


def _convert_gguf(model: nn.Module, weights: dict[str, QuantizedWeight], out: Path, tokenizer: Any,
                  record: dict[str, Any] | None, files: dict[str, str] | None, force: bool) -> Path:
    from lowbit.formats.gguf.writer import write_gguf

    check_gguf(model)
    if out.exists() and not force:
        raise LowbitError(f"{out} exists; pass force=True to replace it")
    st = qat_state(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".lowbit-qat-", dir=out.parent))
    try:
        folder = scratch / "ct"
        fmt = format_for(next(iter(weights.values())).scheme, "compressed-tensors")
        fmt.save(SaveRequest(model, weights, folder, fmt_scheme(weights), st.scale_dtype, tokenizer, False,
                             record or {}, {RECIPE_FILE: st.recipe.to_yaml(), **(files or {})}))
        rep = write_gguf(folder, out, "AUTO")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if rep.requantized or rep.carried_rounded:
        log.warning("GGUF: %d tensors re-quantized, %d carried with float16 rounding of their scales or minima",
                    len(rep.requantized), len(rep.carried_rounded))
    return out


def fmt_scheme(weights: dict[str, QuantizedWeight]) -> Any:
    return next(iter(weights.values())).scheme
