"""The entry points: measure a model's sensitivity, and allocate a budget into a recipe or a GGUF type map.

    from lowbit.mixed import allocate, sensitivity
    recipe = allocate("qwen2.5-coder-0.5b", 4.5, "int", method="gptq")      # a Recipe with per-layer overrides
    lowbit.quantize("qwen2.5-coder-0.5b", recipe, "out/qwen-mix")
    types = allocate("gemma3-270m", 4.9, "gguf", imatrix="g.imatrix.gguf")   # {GGUF tensor: type}
    write_gguf(folder, "g.gguf", "MIX", imatrix=im, types=types)

``compare``-style names for budgeted configurations: ``mix@4.5`` (compressed-tensors, bits per weight of
the quantized linears) and ``gguf:mix@4.9`` (GGUF, bits per weight of the file); :func:`parse_mix`, and
:func:`export_gguf_budget` writes the GGUF file of a budget.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Literal, overload

import torch

from lowbit.core.errors import LowbitError
from lowbit.formats.gguf.imatrix import Imatrix, load_imatrix
from lowbit.methods.gptq import GPTQConfig
from lowbit.mixed.budget import Allocation, Budget, allocate_from, parse_budget
from lowbit.mixed.estimate import SensitivityConfig, estimate, measure
from lowbit.mixed.sensitivity import Sensitivity, pad
from lowbit.recipe.schema import Calibration, Recipe

log = logging.getLogger(__name__)
_MIX = re.compile(r"^(?:(gguf|ct|int):)?mix@(.+)$", re.IGNORECASE)


def parse_mix(spec: str) -> tuple[str, Budget] | None:
    """``mix@4.5`` -> ("int", 4.5 bpw), ``gguf:mix@4.9`` -> ("gguf", 4.9 bpw), ``mix@800MB``; None otherwise."""
    m = _MIX.match(spec.strip())
    if m is None:
        return None
    family = "gguf" if (m.group(1) or "").lower() == "gguf" else "int"
    return family, parse_budget(m.group(2))


def _load(model: Any) -> Any:
    """A loaded model in float32 on the CPU (a loaded one in another dtype is copied, the caller's untouched)."""
    from lowbit.models.loader import LoadedModel, load_model

    if not isinstance(model, LoadedModel):
        return load_model(str(model), device="cpu", dtype=torch.float32)
    p = next(model.model.parameters())
    if p.dtype == torch.float32 and p.device.type == "cpu":
        return model
    return dataclasses.replace(model, model=copy.deepcopy(model.model).to("cpu", torch.float32))


def _imatrix(imatrix: Imatrix | str | Path | None) -> Imatrix | None:
    return load_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix


def eval_windows(tokenizer: Any, data: str | None, windows: int, length: int = 512) -> torch.Tensor:
    """``windows`` consecutive windows of ``length`` tokens from the start of an evaluation text (default
    WikiText-2 test, raw: what llama.cpp's perplexity reads)."""
    from lowbit.data import default_eval_corpus, resolve_eval_text, wikitext2_test

    name = data or default_eval_corpus()
    text = wikitext2_test(raw=True) if name == "wikitext2" else resolve_eval_text(name, None)[1]
    ids = tokenizer(text[: (windows + 1) * length * 16], return_tensors="pt")["input_ids"].reshape(-1)
    if ids.numel() < windows * length:
        raise LowbitError(f"the evaluation text has {ids.numel()} tokens, fewer than {windows} x {length}")
    return ids[: windows * length].reshape(windows, length).clone()


def sensitivity(model: Any, cfg: SensitivityConfig | None = None, *,
                imatrix: Imatrix | str | Path | None = None, measure_windows: int = 0,
                measure_candidates: list[str] | None = None, measure_tensors: str | None = None,
                data: str | None = None, progress: bool = True, device: str = "cpu", sink: Any = None) -> Sensitivity:
    """The sensitivity of ``model`` (spec or loaded model) to each candidate, per tensor; with
    ``measure_windows`` > 0 also the measured single-tensor KLD (of the tensors matching the regular expression
    ``measure_tensors``, at ``measure_candidates``) on that many 512-token windows of ``data``. The passes run on
    ``device`` (the model is held on the CPU between them); ``sink`` receives each GPTQ result
    (:func:`lowbit.mixed.estimate.estimate`)."""
    lm = _load(model)
    im = _imatrix(imatrix)
    sens, st, tokens = estimate(lm, cfg or SensitivityConfig(), imatrix=im, progress=progress, device=device,
                                sink=sink)
    if measure_windows > 0:
        wins = eval_windows(lm.tokenizer, data, measure_windows)
        names = None
        if measure_tensors:
            pat = re.compile(measure_tensors)
            names = [t.name for t in sens.tensors if pat.search(t.name)]
            if not names:
                raise LowbitError(f"--measure-tensors {measure_tensors!r} matches no tensor (named like "
                                  f"{sens.tensors[0].name!r})")
        measure(lm, sens, wins, candidates=measure_candidates, tensors=names, imatrix=im, fisher=st,
                calib_tokens=tokens, progress=progress, device=device)
    return sens


def gguf_overhead(folder: str | Path) -> int:
    """Bytes of a GGUF file before its tensor data: header, metadata and tokenizer (measured by writing them
    alone), each tensor's info (name, dims, type, offset: ``8 + len + 4 + 8 * dims + 4 + 8``), padded to the
    32-byte alignment. (Each tensor's own padding is counted with its bytes: ``Sensitivity.nbytes``.)"""
    from lowbit.formats.gguf.convert import HFSource, gguf_tensors
    from lowbit.formats.gguf.writer import write_gguf

    with tempfile.TemporaryDirectory(prefix=".lowbit-meta-") as d:
        head = write_gguf(folder, Path(d) / "v.gguf", "F32", vocab_only=True).size_bytes
    tensors = gguf_tensors(HFSource(folder))
    info = sum(8 + len(n) + 4 + 8 * len(t.shape) + 4 + 8 for n, t in tensors.items())
    return pad(head + info)


def plan(model: Any, budget: Budget | str | float, family: str = "int", *, method: str = "gptq",
         candidates: list[str] | None = None, sens: Sensitivity | str | Path | None = None,
         imatrix: Imatrix | str | Path | None = None, calib: str | None = None, samples: int = 8,
         length: int = 512, scale_bytes: int = 2, progress: bool = True) -> Allocation:
    """The allocation of ``budget`` on ``model``: from a sensitivity file when given, else measured now."""
    b = budget if isinstance(budget, Budget) else parse_budget(budget)
    if isinstance(sens, (str, Path)):
        sens = Sensitivity.load(sens)
    if sens is not None and sens.family != family:
        raise LowbitError(f"the sensitivity file is for {sens.family} candidates, not {family}")
    lm = None
    if sens is None:
        lm = _load(model)
        cfg = SensitivityConfig(family=family, candidates=tuple(candidates) if candidates else None,
                                method=method, calib=calib, samples=samples, length=length, scale_bytes=scale_bytes)
        sens = sensitivity(lm, cfg, imatrix=imatrix, progress=progress)
    overhead = 0
    if family == "gguf":
        from lowbit.models.loader import LoadedModel

        folder = lm.path if isinstance(lm, LoadedModel) else _folder(model)
        overhead = gguf_overhead(folder)
    return allocate_from(sens, b, overhead)


def _folder(model: Any) -> Path:
    from lowbit.models.sources import SOURCES, ensure_source

    p = Path(str(model)).expanduser()
    if str(model) in SOURCES and not p.exists():
        return ensure_source(str(model))
    if p.is_dir():
        return p
    return Path(_load(model).path)


def _method_name(method: Any) -> str:
    """A sensitivity method name from a name or a recipe method config (GPTQConfig -> ``gptq`` ...)."""
    if isinstance(method, str):
        return {"imatrix-rtn": "imatrix"}.get(method, method)
    from lowbit.pipeline.rtn import ImatrixConfig, RTNConfig

    for cls, name in ((GPTQConfig, "gptq"), (ImatrixConfig, "imatrix"), (RTNConfig, "rtn")):
        if isinstance(method, cls):
            return name
    raise LowbitError(f"budgeted configurations allocate for RTN, importance-weighted RTN or GPTQ, not "
                      f"{type(method).__name__}")


def _budget(budget: Budget | str | float | None) -> Budget:
    if budget is None:
        raise LowbitError("a budgeted configuration needs a budget (bits per weight or a size)")
    return budget if isinstance(budget, Budget) else parse_budget(budget)


@overload
def allocate(model: Any, budget: Budget | str | float | None, family: Literal["int"] = "int", *,
             method: Any = "gptq", base: Recipe | None = None, calibration: Calibration | None = None,
             **kw: Any) -> Recipe: ...
@overload
def allocate(model: Any, budget: Budget | str | float | None, family: Literal["gguf"], *, method: Any = "gptq",
             base: Recipe | None = None, calibration: Calibration | None = None, **kw: Any) -> dict[str, str]: ...
def allocate(model: Any, budget: Budget | str | float | None, family: str = "int", *, method: Any = "gptq",
             base: Recipe | None = None, calibration: Calibration | None = None,
             **kw: Any) -> Recipe | dict[str, str]:
    """A budgeted configuration of ``model`` (a spec or a loaded model): a :class:`Recipe` with per-layer
    overrides (``family="int"``: compressed-tensors; ``method`` a name, ``gptq`` / ``rtn`` / ``imatrix``, or a
    method config kept as the recipe's; on top of ``base``), or a GGUF type map (``family="gguf"``: pass the
    ``imatrix`` the file will be written with). ``calibration`` lends its corpus and seed to the sensitivity
    pass (at most 8 sequences of at most 512 tokens: the Fisher pass is a forward and a backward each) and
    becomes the recipe's. Other keyword arguments go to :func:`plan` (``candidates``, ``sens``, ``imatrix``,
    ``samples``, ``length``)."""
    name = _method_name(method)
    if calibration is not None:
        kw.setdefault("calib", calibration.corpus)
        kw.setdefault("samples", min(calibration.samples, 8))
        kw.setdefault("length", min(calibration.length or 512, 512))
    a = plan(model, _budget(budget), family, method=name, **kw)
    if family == "gguf":
        return a.gguf_types()
    cfg = method if not isinstance(method, str) else method_config(name)
    if calibration is not None:
        base = (base or a.recipe()).replace(calibration=calibration)
    return a.recipe(base, method=cfg)


def export_gguf_budget(folder: str | Path, out: str | Path, budget: Budget | str | float | None, *,
                       imatrix: Imatrix | str | Path | None = None, **kw: Any) -> Any:
    """Write the float checkpoint ``folder`` as a GGUF file at ``out`` with per-tensor types chosen for
    ``budget`` (the file's bits per weight, or a size); returns the writer's report (every tensor's type)."""
    from lowbit.formats.gguf.writer import write_gguf

    im = _imatrix(imatrix)
    a = plan(folder, _budget(budget), "gguf", imatrix=im, **kw)
    return write_gguf(folder, out, "MIX", imatrix=im, types=a.gguf_types())


def method_config(method: str) -> Any:
    """The recipe's method config of a sensitivity method name (defaults)."""
    from lowbit.pipeline.rtn import ImatrixConfig, RTNConfig

    return {"gptq": GPTQConfig(), "rtn": RTNConfig(), "imatrix": ImatrixConfig()}[method]
