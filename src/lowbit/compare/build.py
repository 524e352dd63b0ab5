"""Making each configuration's artifact (once: cached under the compare folder by its key).

A recipe config is quantized from a copy of the loaded reference (calibration text drawn once for all);
its integer group size is lowered, when it does not divide every linear's input, to the largest power
of two that does (and the report says so). A GGUF config is converted from the source folder by
``lowbit gguf``'s writer; ``+imatrix`` configs share one importance matrix made from the same
calibration text.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.compare.configs import Config
from lowbit.core.scheme import QuantScheme
from lowbit.jobs.quantization import quantize_loaded
from lowbit.models.loader import LoadedModel, model_size_bytes
from lowbit.pipeline.awq import AWQConfig
from lowbit.pipeline.engine import Engine
from lowbit.recipe.schema import Calibration, Recipe

log = logging.getLogger(__name__)


@dataclass
class Built:
    path: str
    size_bytes: int
    quantize_seconds: float
    recipe: dict[str, Any] | None
    notes: list[str]


def fitting_group_size(model: nn.Module, preferred: int) -> int:
    """The largest power-of-two group size <= ``preferred`` dividing the input dim of every linear."""
    dims = {m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    g = preferred
    while g > 1 and any(d % g for d in dims):
        g //= 2
    return g


def fit_recipe(recipe: Recipe, model: nn.Module, calib: Calibration) -> tuple[Recipe, list[str]]:
    """The recipe with the compare run's calibration (where it names none) and a group size that fits."""
    notes = []
    if recipe.calibration.corpus is None:
        recipe = recipe.replace(calibration=calib)
    s = recipe.scheme
    if isinstance(s, QuantScheme) and s.group_size is not None:
        g = fitting_group_size(model, s.group_size)
        if g != s.group_size:
            recipe = recipe.replace(scheme=s.with_options(group_size=g))
            notes.append(f"group size {g} (the scheme's {s.group_size} does not divide every linear's input)")
    return recipe, notes


QUICK_AWQ_TOKENS, QUICK_AWQ_GRID = 2048, 10  # lowbit run's AWQ search: a small fraction of the default's time


def build_recipe(config: Config, ref: LoadedModel, folder: Path, calib: Calibration, engine: Engine, *,
                 qat_steps: int = 300, eval_data: str | None = None, quick: bool = False) -> Built:
    """Quantize (and for ``+qat`` configs train: ``qat_steps`` steps on the calibration text, checked disjoint
    from ``eval_data``) a copy of ``ref`` into ``folder/artifact``. ``quick``: an AWQ config left at its
    defaults searches ``QUICK_AWQ_TOKENS`` tokens on a ``QUICK_AWQ_GRID``-point grid (the report's recipe says so)."""
    assert config.recipe is not None
    recipe, notes = fit_recipe(config.recipe, ref.model, calib)
    m = recipe.method
    if quick and isinstance(m, AWQConfig) and m == AWQConfig(inner=m.inner):
        recipe = recipe.replace(method=dataclasses.replace(m, max_tokens=QUICK_AWQ_TOKENS, grid=QUICK_AWQ_GRID))
        notes.append(f"AWQ search shortened for a quick run: {QUICK_AWQ_TOKENS} tokens, {QUICK_AWQ_GRID}-point grid")
    if config.budget is not None:
        recipe, more = _allocate(config, ref, recipe, calib)
        notes += more
    out = folder / "artifact"
    t0 = time.perf_counter()
    res: Any
    if config.qat:
        from lowbit import qat

        qcfg = qat.QATConfig(qat.TrainConfig(steps=qat_steps, seed=calib.seed), corpus=calib.corpus,
                             seq_len=min(calib.length or 512, 512), eval_data=eval_data)
        res = qat.run(ref, recipe, out, qcfg, engine=engine, force=True,
                      progress=engine.progress)  # trains a copy of ref; ref is the teacher
        used = res.recipe
    else:
        work = copy.deepcopy(ref)
        res = quantize_loaded(work, recipe, out, engine=engine, force=True, source=ref.name)
        used = res.recipe
        del work
    return Built(str(out), model_size_bytes(out), time.perf_counter() - t0, used.to_dict(), notes)


def _allocate(config: Config, ref: LoadedModel, recipe: Recipe, calib: Calibration) -> tuple[Recipe, list[str]]:
    from lowbit.mixed import allocate

    mixed = allocate(ref, config.budget, method=recipe.method, base=recipe, calibration=calib)
    return mixed, [f"per-layer schemes for {config.budget} bits per weight"]


def build_gguf(config: Config, ref: LoadedModel, folder: Path, imatrix: Path | None, engine: Engine) -> Built:
    from lowbit.jobs.gguf import export_gguf

    out = folder / "model.gguf"
    t0 = time.perf_counter()
    if config.budget is not None:
        from lowbit.mixed import export_gguf_budget

        rep = export_gguf_budget(str(ref.path), out, config.budget, imatrix=imatrix)
    else:
        rep = export_gguf(str(ref.path), out, config.gguf_type, imatrix=imatrix, force=True)
    info = {"gguf_type": rep.file_type, "imatrix": imatrix is not None, "tensor_types": rep.type_counts()}
    return Built(str(out), out.stat().st_size, time.perf_counter() - t0, info, [])


def make_imatrix(ref: LoadedModel, path: Path, calib: Calibration, engine: Engine) -> Path:
    """An importance matrix of the reference on the calibration text (llama.cpp's GGUF imatrix format)."""
    if path.is_file():
        return path
    from lowbit.jobs.gguf import compute_imatrix

    compute_imatrix(str(ref.path), path, calib=calib.corpus, samples=calib.samples, length=calib.length or 512,
                    seed=calib.seed, device=engine.resolved_device(), progress=engine.progress)
    return path


def reference_built(ref: LoadedModel) -> Built:
    return Built(str(ref.path), model_size_bytes(ref.path), 0.0, None, [])


def as_dict(b: Built) -> dict[str, Any]:
    return dataclasses.asdict(b)
