"""The quantize job: a model and a :class:`~lowbit.recipe.Recipe` in, an artifact folder out.

Every input is checked before the model loads (output folder, device, calibration data); the
recipe is then resolved against the model (:func:`lowbit.recipe.plan.make_plan`) before any
calibration work. The artifact holds the exact recipe (``recipe.yaml``: defaults resolved, so a
replay reproduces the weights byte for byte) and the provenance record (``provenance.json``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.io import check_output_dir
from lowbit.core.qweight import QuantizedWeight
from lowbit.data import calibration_texts, calibration_tokens
from lowbit.formats.hf_folder import RECIPE_FILE
from lowbit.formats.registry import SaveRequest, format_for
from lowbit.jobs.provenance import SourceChecksum, record, source_name
from lowbit.jobs.reports import method_reports
from lowbit.models.archs import get_arch
from lowbit.models.loader import LoadedModel, check_spec, load_model, model_size_bytes, peek_config
from lowbit.pipeline.blockwise import run_blockwise
from lowbit.pipeline.checkpoint import BlockCheckpoint, resume_dir
from lowbit.pipeline.distributed import shard, world
from lowbit.pipeline.engine import Engine
from lowbit.pipeline.estimate import check_fits, compute_rate, estimate_run
from lowbit.pipeline.registry import build_method
from lowbit.recipe.plan import Plan, make_plan
from lowbit.recipe.schema import Recipe

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QuantizeResult:
    """What a quantize job wrote: the folder, the exact recipe, and the figures a user asks first."""

    path: Path
    recipe: Recipe
    seconds: float
    size_bytes: int
    bits_per_weight: float
    n_linears: int
    kept: list[str]
    record: dict[str, Any]


def bits_per_weight(weights: dict[str, Any], scale_bits: int = 16) -> float:
    """Average storage bits per quantized weight: codes, scales and zero points (or the data type's own)."""
    total_w = total_bits = 0.0
    for qw in weights.values():
        out, inp = qw.shape
        if isinstance(qw, QuantizedWeight):
            g = qw.scales.shape[1]
            zbits = 0 if qw.scheme.symmetric else qw.scheme.bits
            total_bits += out * inp * qw.scheme.bits + out * g * (scale_bits + zbits)
        else:
            total_bits += out * inp * qw.scheme.bits_per_weight(inp, out)
        total_w += out * inp
    return total_bits / max(total_w, 1)


def _pairs(recipe: Recipe) -> list[tuple[Any, Any]]:
    """Every (scheme, method config) a recipe can give a layer."""
    return list(dict.fromkeys([(recipe.scheme, recipe.method)] + [
        (o.scheme or recipe.scheme, o.method or recipe.method) for o in recipe.overrides if not o.keep]))


def needs_calibration(recipe: Recipe) -> bool:
    """Whether any method of the recipe needs calibration text (known without the model)."""
    return any(build_method(m, s, torch.bfloat16).needs_calibration for s, m in _pairs(recipe))


def resolve_calibration(recipe: Recipe) -> tuple[Recipe, list[str], dict[str, Any]]:
    """The recipe with its calibration corpus and length resolved, the documents, and what the record says
    (a fallback to another corpus is a warning, recorded in both; :func:`lowbit.data.calibration_texts`)."""
    corpus, texts, fallback = calibration_texts(recipe.calibration.corpus)
    resolved = recipe.replace(calibration=dataclasses.replace(recipe.calibration, corpus=corpus,
                                                              length=recipe.calibration_length()))
    info: dict[str, Any] = {"corpus": corpus, "documents": len(texts)}
    if fallback:
        info["fallback"] = fallback
    return resolved, texts, info


def check_inputs(recipe: Recipe, out: str | Path, engine: Engine, force: bool, model: Any = None) -> str:
    """Every check that needs no loaded model: output folder, device, scheme/method/format, calibration data,
    and (from ``config.json`` when it is at hand) the group size. Returns the device."""
    check_output_dir(out, force)
    device = engine.resolved_device()
    format_for(recipe.scheme, recipe.export.format)
    if recipe.overrides and recipe.export.format not in ("auto", "compressed-tensors"):
        raise LowbitError(f"the {recipe.export.format} format holds one scheme; per-layer schemes need "
                          "compressed-tensors")
    if needs_calibration(recipe):  # also builds each method for its schemes: an incompatible pair is refused
        resolve_calibration(recipe)
    cfg = peek_config(model) if isinstance(model, (str, Path)) else None
    if cfg and not recipe.overrides:
        heads = int(cfg.get("num_attention_heads") or 0)
        dims = {cfg.get("hidden_size"), cfg.get("intermediate_size"),
                heads * int(cfg.get("head_dim") or (cfg.get("hidden_size") or 0) // max(heads, 1))}
        for d in sorted(x for x in dims if isinstance(x, int) and x > 0):
            try:
                recipe.scheme.check_input(d)
            except LowbitError as e:
                raise LowbitError(f"{model}: a linear has input dimension {d}: {e}") from None
    return device


def quantize(model: str | Path | LoadedModel, recipe: Recipe, out: str | Path, *, engine: Engine | None = None,
             force: bool = False) -> QuantizeResult:
    """Quantize ``model`` (offline source name, folder, .gguf, hub id, or a loaded model) by ``recipe`` into the
    artifact folder ``out``; inputs are checked before the model loads."""
    engine = engine or Engine()
    if not isinstance(model, LoadedModel):
        check_spec(model)
    device = check_inputs(recipe, out, engine, force, model)
    if isinstance(model, LoadedModel):
        lm = model
    else:  # weights live on the CPU and visit the device block by block: bf16 compute on accelerators
        lm = load_model(str(model), device="cpu", dtype=None if device == "cpu" else torch.bfloat16)
    return quantize_loaded(lm, recipe, out, engine=dataclasses.replace(engine, device=device), force=force,
                           source=str(model) if not isinstance(model, LoadedModel) else lm.name)


def storage_dtype(lm: LoadedModel, recipe: Recipe) -> torch.dtype:
    """Dtype of scales and unquantized tensors: the recipe's, else the checkpoint's (bf16 for float32 ones)."""
    if recipe.export.dtype:
        return DTYPES[recipe.export.dtype]
    return lm.storage_dtype if lm.storage_dtype != torch.float32 else torch.bfloat16


def quantize_loaded(lm: LoadedModel, recipe: Recipe, out: str | Path, *, engine: Engine | None = None,
                    force: bool = False, source: str | None = None) -> QuantizeResult:
    """Quantize an already loaded model (modified in place) and write the artifact to ``out``."""
    engine = engine or Engine()
    device = engine.resolved_device()
    check_output_dir(out, force)
    store = storage_dtype(lm, recipe)
    recipe = recipe.replace(export=dataclasses.replace(recipe.export, dtype=str(store).removeprefix("torch.")))
    checksum = SourceChecksum(Path(lm.path))
    plan = make_plan(recipe, lm.model, store, engine)
    fmt = format_for(plan.schemes()[0], recipe.export.format)
    if len(plan.schemes()) > 1 and fmt.name != "compressed-tensors":
        raise LowbitError(f"the {fmt.name} format holds one scheme; per-layer schemes need compressed-tensors")
    tokens: torch.Tensor | None = None
    cal_info: dict[str, Any] = {}
    if any(p.method.needs_calibration for p in plan.parts):
        tokens, cal_info, recipe = _calibrate(lm, recipe, plan, device, engine)
    ckpt = _checkpoint(engine, out, recipe, source or lm.name, lm, tokens)
    t0 = time.perf_counter()
    weights = run_blockwise(lm.model, plan.parts, tokens, device=device, progress=engine.progress,
                            offload_activations=engine.offload_activations, checkpoint=ckpt)
    seconds = time.perf_counter() - t0
    reports, save_opts = method_reports(plan, engine)
    rank, size = world()
    spec = get_arch(lm.model)
    arch: dict[str, Any] = {"name": spec.name, "derived": spec.derived}
    if arch["derived"]:  # a table the fallback derived: record it, so a rerun can be checked against it
        arch["groups"] = [{"prev": g.prev, "linears": list(g.linears)} for g in spec.groups]
    extra: dict[str, Any] = {"methods": reports, "architecture": arch,
                             **({"calibration": cal_info} if cal_info else {})}
    if size > 1:
        extra["world_size"] = size
    rec = record(source_name(source or lm.name, Path(lm.path)), checksum.result(), seconds, device, extra)
    if rank == 0:
        fmt.save(SaveRequest(lm.model, weights, Path(out), plan.schemes()[0], store, lm.tokenizer, force,
                             rec, {RECIPE_FILE: recipe.to_yaml()}, **save_opts))
    if size > 1:
        torch.distributed.barrier()
    if ckpt is not None and rank == 0:
        ckpt.remove()
    kept = sorted(n for n, m in lm.model.named_modules() if isinstance(m, nn.Linear) and n not in weights)
    return QuantizeResult(Path(out), recipe, seconds, model_size_bytes(out), bits_per_weight(weights),
                          len(weights), kept, rec)


def _checkpoint(engine: Engine, out: str | Path, recipe: Recipe, source: str, lm: LoadedModel,
                tokens: torch.Tensor | None) -> BlockCheckpoint | None:
    """Per-block state for a calibrated single-process run that asks for it (the engine adds the tokens' hash)."""
    if not (engine.checkpoint or engine.resume) or tokens is None or world()[1] > 1:
        return None
    return BlockCheckpoint(resume_dir(out), f"{source}\n{lm.path}\n{recipe.to_yaml()}", resume=engine.resume)


def _calibrate(lm: LoadedModel, recipe: Recipe, plan: Plan, device: str, engine: Engine
               ) -> tuple[torch.Tensor, dict[str, Any], Recipe]:
    """This rank's calibration tokens, the record's calibration entry, and the recipe with them resolved.
    The run's estimate is logged and checked against the device's free memory first."""
    dev = torch.device(device)
    first = next(p.method for p in plan.parts if p.method.needs_calibration)
    # the estimate's matmul rate is taken first: GPTQ's background warm-up would share the device
    # (and the GIL, while Triton compiles) with the timing loop and make the estimate pessimistic
    rate = compute_rate(dev, next(lm.model.parameters()).dtype)
    for p in plan.parts:
        p.method.prepare(dev)  # GPTQ compiles its GPU kernels in the background while the text is read
    recipe, texts, info = resolve_calibration(recipe)
    cal = recipe.calibration
    assert cal.length is not None
    full = calibration_tokens(lm.tokenizer, texts, cal.samples, cal.length, seed=cal.seed)
    info.update(samples=cal.samples, length=cal.length, seed=cal.seed, tokens=int(full.numel()))
    log.info("calibration: %s, %d documents, %d x %d tokens", info["corpus"], info["documents"], cal.samples,
             cal.length)
    tokens = shard(full)
    est = estimate_run(lm.model, get_arch(lm.model), first, tokens.shape[0], cal.length, dev, rate=rate,
                       offload=engine.offload_activations)
    log.info(est.describe())
    check_fits(est, dev)
    return tokens, info, recipe
