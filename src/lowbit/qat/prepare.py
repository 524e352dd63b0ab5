"""``prepare``: a model and a recipe in, the same model with fake-quant linears out, ready to train.

1. The recipe is resolved against the model (:func:`lowbit.recipe.plan.make_plan`): the same checks,
   the same per-layer schemes and 16-bit layers as ``lowbit quantize``.
2. The recipe's PTQ method runs through the block engine (RTN, imatrix, GPTQ or AWQ;
   :func:`lowbit.pipeline.blockwise.run_blockwise`), unless its result is given.
3. Every tensor the artifact stores is rounded to the artifact's storage dtype, so that the model that
   trains is the model that ships (embeddings, norms and 16-bit linears included).
4. Each quantized linear becomes a :class:`~lowbit.qat.fakequant.FakeQuantLinear` holding the PTQ
   result's scales and zero points, and a latent weight whose rounding gives the PTQ codes, so step 0
   reproduces the PTQ artifact exactly. ``init="auto"``: after round to nearest (RTN, imatrix) the
   latent weight is the float weight itself (moved into its cell where clipping or the edge demands:
   :func:`~lowbit.qat.fakequant.project_into_cells`); after GPTQ and AWQ it is the dequantized PTQ
   weight, at the centre of each cell. The float weight projected into GPTQ's cells (``init="project"``)
   sits on the edge of every cell where GPTQ chose another code than round to nearest, so the first
   updates flip those codes back: on SmolLM2 W3 g64 the KD loss went from 0.57 to 4.3 in ten steps
   (learning rate 1e-4), while RTN's float init recovered 83% of its gap in 100 steps.
5. Everything else is frozen: only the fake-quant layers' parameters train. Without ``train_weights`` the
   PTQ codes are frozen too and only scales and zero points train (EfficientQAT's E2E-QP).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.models.archs import get_arch
from lowbit.pipeline.awq import AWQConfig
from lowbit.pipeline.blockwise import run_blockwise
from lowbit.pipeline.engine import Engine
from lowbit.pipeline.quantize import named_linears
from lowbit.pipeline.rtn import ImatrixConfig, RTNConfig
from lowbit.qat.fakequant import FakeQuantLinear, project_into_cells
from lowbit.recipe.plan import Plan, make_plan
from lowbit.recipe.schema import Recipe

log = logging.getLogger(__name__)

INITS = ("auto", "project", "ptq")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QATState:
    """What :func:`prepare` leaves on the model (``model.lowbit_qat``) for :func:`lowbit.qat.convert`."""

    recipe: Recipe
    scale_dtype: torch.dtype
    kept: list[str]
    ptq_seconds: float = 0.0
    actorder: str | None = None
    init: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


def storage_dtype(model: nn.Module, recipe: Recipe) -> torch.dtype:
    """The artifact's dtype of scales and unquantized tensors: the recipe's, else the model's (bf16 for float32)."""
    if recipe.export.dtype:
        return DTYPES[recipe.export.dtype]
    dt = next(model.parameters()).dtype
    return torch.bfloat16 if dt == torch.float32 else dt


def check_recipe(recipe: Recipe) -> None:
    """QAT trains integer weight grids (W8A16 ... W2A16): refuse data types and int8 activations up front."""
    schemes = [recipe.scheme] + [o.scheme for o in recipe.overrides if o.scheme is not None]
    for s in schemes:
        if not isinstance(s, QuantScheme) or s.act_bits:
            raise LowbitError(f"QAT trains integer weight-only schemes (W4A16, W3A16_ASYM ...); {s.label} is not one. "
                              "Quantize it with `lowbit quantize` instead")
    if recipe.export.format not in ("auto", "compressed-tensors"):
        raise LowbitError(f"QAT artifacts are written as compressed-tensors (or GGUF by lowbit.qat.convert), "
                          f"not {recipe.export.format}; set the recipe's export format to auto")


def round_stored_tensors(model: nn.Module, quantized: set[str], dtype: torch.dtype) -> int:
    """Round, in place, every floating tensor the artifact stores (the state dict, less the quantized
    linears' weights) to ``dtype``; returns how many were changed."""
    changed = 0
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            module = k.rsplit(".", 1)[0]
            if (module in quantized and k != f"{module}.bias") or not v.is_floating_point():
                continue
            r = v.data.to(dtype).to(v.dtype)
            if not torch.equal(r, v.data):
                v.data.copy_(r)
                changed += 1
    return changed


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).register_module(child, module)


def prepare(model: nn.Module, recipe: Recipe, *, tokens: torch.Tensor | None = None,
            weights: dict[str, QuantizedWeight] | None = None, train_weights: bool = True, init: str = "auto",
            engine: Engine | None = None) -> nn.Module:
    """Swap ``recipe``'s linears of ``model`` (in place) for fake-quant ones initialised from its PTQ method.

    ``tokens (n, T)``: calibration tokens for methods that need them (GPTQ, AWQ, imatrix); ``weights``: a PTQ
    result of this recipe on this model (``{full name: QuantizedWeight}``) to start from instead of running
    the method (the model must then hold the float weights the result was made from). ``train_weights``:
    the latent weights train (else only scales and zero points). ``init``: ``project`` (the float weight
    moved into the PTQ codes' cells), ``ptq`` (the dequantized PTQ weight) or ``auto`` (``project`` after
    round to nearest, ``ptq`` after GPTQ or AWQ; see the module docstring). Returns ``model``, with
    :class:`QATState` as ``model.lowbit_qat``.
    """
    import time

    if init not in INITS:
        raise LowbitError(f"init must be one of {INITS}, got {init!r}")
    check_recipe(recipe)
    if hasattr(model, "lowbit_qat"):
        raise LowbitError("this model is already prepared for QAT; load a fresh model to prepare it again")
    engine = engine or Engine(device="cpu")
    store = storage_dtype(model, recipe)
    plan = make_plan(recipe, model, store, engine)
    linears = dict(named_linears(model, get_arch(model)))
    quantized = [n for n, c in plan.choices.items() if c is not None]
    methods = [c.method for c in plan.choices.values() if c is not None]
    awq = any(isinstance(m, AWQConfig) for m in methods)  # scales folded: the float weights' basis changed
    rounded = all(isinstance(m, (RTNConfig, ImatrixConfig)) for m in methods)
    project = not awq and (init == "project" or (init == "auto" and rounded))
    originals = {n: linears[n].weight.detach().to(torch.float32).clone() for n in quantized} if project else {}
    t0 = time.perf_counter()
    if weights is None:
        weights = _run_ptq(model, plan, tokens, engine)
    missing = set(quantized) - set(weights)
    if missing:
        raise LowbitError(f"the PTQ result has no weight for {sorted(missing)[:3]}; give the result of this recipe")
    ptq_seconds = time.perf_counter() - t0
    n = round_stored_tensors(model, set(quantized), store)
    log.info("QAT: %d linears fake-quantized (%s), %d kept 16-bit, %d stored tensors rounded to %s", len(quantized),
             ", ".join(dict.fromkeys(s.label for s in plan.schemes())), len(plan.kept), n,
             str(store).removeprefix("torch."))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in quantized:
        qw, lin = weights[name], linears[name]
        latent = project_into_cells(originals.pop(name), qw) if project else qw.dequantize(torch.float32)
        fq = FakeQuantLinear(latent, qw, lin.bias, scale_dtype=store, train_weight=train_weights)
        if not train_weights:
            fq.freeze_codes()  # scales only: from the PTQ codes (LSQ through the rounding gives them no gradient)
        _replace(model, name, fq.to(lin.weight.device))
    model.lowbit_qat = QATState(recipe, store, plan.kept, ptq_seconds, _actorder(plan),  # type: ignore[assignment]
                                "project" if project else "ptq")
    return model


def _run_ptq(model: nn.Module, plan: Plan, tokens: torch.Tensor | None, engine: Engine) -> dict[str, Any]:
    if any(p.method.needs_calibration for p in plan.parts) and tokens is None:
        raise LowbitError("the recipe's method needs calibration tokens: pass tokens=, or start from weights=")
    with torch.no_grad():
        return run_blockwise(model, plan.parts, tokens, device=engine.resolved_device(), progress=engine.progress,
                             offload_activations=engine.offload_activations)


def _actorder(plan: Plan) -> str | None:
    for m in plan.methods.values():
        cfg = getattr(m, "config", None) or getattr(getattr(m, "inner", None), "config", None)
        if getattr(cfg, "act_order", False):
            return "weight" if getattr(cfg, "static_groups", True) else "group"
    return None


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """``{full name: layer}`` of every fake-quant linear of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def qat_state(model: nn.Module) -> QATState:
    st = getattr(model, "lowbit_qat", None)
    if not isinstance(st, QATState):
        raise LowbitError("this model was not prepared for QAT: call lowbit.qat.prepare(model, recipe) first")
    return st
