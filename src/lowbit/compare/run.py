"""``lowbit compare``: quantize one model every way on a menu, measure each artifact, recommend one.

Per configuration, on the artifact read back from disk: size and bits per weight (whole file); perplexity,
KLD and top-1 by the pinned protocol; zero-shot tasks when asked; and, on the engine meant for it,
prefill/decode tokens/s, load time and peak memory (:mod:`lowbit.compare.speed`, a fresh process each).

Everything is cached under ``DIR/configs/<name>-<key>/`` (the key hashes the config, model and calibration):
a killed run, started again, redoes nothing it finished (``result.json`` gains each stage atomically).
``strategy="fast"`` first scores every config on one window (KLD) and measures fully only those that may
be on the size/KLD Pareto front (within :data:`PROXY_SLACK`) or meet the limits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit import __version__
from lowbit.compare.build import as_dict, build_gguf, build_recipe, make_imatrix, reference_built
from lowbit.compare.configs import Config
from lowbit.compare.recommend import Limits, recommend, shortfalls
from lowbit.compare.report import write_report
from lowbit.compare.speed import run_speed
from lowbit.core.errors import LowbitError
from lowbit.core.io import write_json_atomic
from lowbit.core.progress import progress as ticker
from lowbit.jobs.provenance import machine
from lowbit.models.loader import LoadedModel, load_model
from lowbit.pipeline.engine import Engine
from lowbit.recipe.schema import Calibration

log = logging.getLogger(__name__)

MARKER = "compare.json"
PROXY_SLACK = 1.25  # a config is measured unless a smaller one's one-window KLD is below its own / this


@dataclass(frozen=True)
class Measure:
    """How quality and speed are measured."""

    data: str | None = None  # evaluation corpus (default wikitext2 when found)
    protocol: str = "gptq"
    ctx: int = 2048
    windows: int = 8
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    n_prompt: int = 512
    n_gen: int = 128
    reps: int = 3
    speed: bool = True
    eval_group: int = 4  # artifacts held in memory at once during evaluation


@dataclass
class Options:
    calibration: Calibration = field(default_factory=lambda: Calibration(None, 32, 512))
    measure: Measure = field(default_factory=Measure)
    limits: Limits = field(default_factory=Limits)
    strategy: str = "full"
    engine: Engine = field(default_factory=lambda: Engine(device="cpu"))
    qat_steps: int = 300  # training steps of ``...+qat`` configs
    quick: bool = False  # AWQ configs at their defaults search a shorter grid on fewer tokens (lowbit run)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)[:40]


def prepare_dir(out: Path, model: str) -> None:
    """The compare folder: new, empty, or an earlier compare of the same model (resumed)."""
    if out.exists() and not out.is_dir():
        raise LowbitError(f"{out} is a file; give a folder for the compare results")
    if out.is_dir() and any(out.iterdir()):
        marker = out / MARKER
        if not marker.is_file():
            raise LowbitError(f"{out} is not empty and holds no earlier compare of this model; choose another -o")
        prev = json.loads(marker.read_text()).get("model")
        if prev != model:
            raise LowbitError(f"{out} holds a compare of {prev!r}, not {model!r}; choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MARKER, {"model": model, "lowbit_version": __version__})


class Cell:
    """One config's cache folder and its ``result.json``."""

    def __init__(self, out: Path, config: Config, key: str) -> None:
        self.config = config
        self.folder = out / "configs" / f"{_slug(config.name)}-{key}"
        self.file = self.folder / "result.json"
        self.data: dict[str, Any] = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def save(self, **stages: Any) -> None:
        self.data.update(stages)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.file, self.data)


def compare(model: str, configs: list[Config], out: str | Path, opts: Options) -> dict[str, Any]:
    """Run the comparison (see the module docstring); returns the report (also written under ``out``)."""
    t_start = time.perf_counter()
    out = Path(out)
    if opts.strategy not in ("full", "fast"):
        raise LowbitError(f"strategy must be full or fast, got {opts.strategy!r}")
    prepare_dir(out, model)
    ref = load_model(model)
    n_params = sum(p.numel() for p in {id(p): p for p in ref.model.parameters()}.values())
    cal = opts.calibration
    cal = dataclasses.replace(cal, corpus=cal.corpus or _default_corpus())
    extra = {"model": model, "calibration": dataclasses.asdict(cal)}
    cells = [Cell(out, c, c.key(extra)) for c in configs]
    m = opts.measure
    steps = len(cells) * (3 if m.speed else 2)
    with ticker(f"compare {len(cells)} configs", steps, opts.engine.progress, every=10.0) as bar:
        _build_all(cells, ref, out, cal, opts, bar)
        if opts.strategy == "fast":
            _proxy(cells, ref, m, opts)
            chosen = _candidates(cells, opts.limits)
        else:
            chosen = cells
        _quality(chosen, ref, m, opts, bar)
        if m.tasks:
            _tasks(chosen, ref, m)
        if m.speed:
            for c in chosen:
                _speed(c, m, opts)
                bar.advance()
    rows = [_row(c, n_params, c in chosen) for c in cells]
    ref_row = next(r for r in rows if r["name"] == "reference")
    for r in rows:
        if r.get("ppl") is not None and ref_row.get("ppl"):
            r["ppl_increase_pct"] = 100.0 * (r["ppl"] / ref_row["ppl"] - 1.0)
    measured = [r for r in rows if r["measured"] == "full"]
    report = {"lowbit_version": __version__, "model": model, "strategy": opts.strategy, "n_params": n_params,
              "eval": {"corpus": ref_row.get("corpus"), "protocol": m.protocol, "ctx": m.ctx, "windows": m.windows,
                       "tokens": ref_row.get("tokens_scored")},
              "speed": {"device": opts.engine.device, "threads": torch.get_num_threads(), "n_prompt": m.n_prompt,
                        "n_gen": m.n_gen, "reps": m.reps},
              "calibration": dataclasses.asdict(cal), "rows": rows,
              "recommendation": recommend(measured, opts.limits),
              "fully_measured": len(measured), "menu_size": len(rows),
              "notes": [f"{r['name']}: {n}" for r in rows for n in r.get("notes", [])],
              "machine": machine(), "total_seconds": time.perf_counter() - t_start}
    write_report(report, out)
    return report


def _default_corpus() -> str:
    from lowbit.data import calibration_texts

    return calibration_texts(None)[0]


def _build_all(cells: list[Cell], ref: LoadedModel, out: Path, cal: Calibration, opts: Options, bar: Any) -> None:
    imatrix: Path | None = None
    for c in cells:
        if "build" not in c.data:
            cfg = c.config
            log.info("building %s", cfg.name)
            if cfg.kind == "reference":
                built = reference_built(ref)
            elif cfg.kind == "gguf":
                if cfg.imatrix and imatrix is None:
                    imatrix = make_imatrix(ref, out / "imatrix.gguf", cal, opts.engine)
                built = build_gguf(cfg, ref, c.folder, imatrix if cfg.imatrix else None, opts.engine)
            else:
                built = build_recipe(cfg, ref, c.folder, cal, opts.engine, qat_steps=opts.qat_steps,
                                     eval_data=opts.measure.data, quick=opts.quick)
            c.save(build=as_dict(built))
        bar.advance()


def _load_for_eval(c: Cell, ctx: int) -> Any:
    path = c.data["build"]["path"]
    if c.config.kind == "gguf":
        from lowbit.eval.llamacpp import LlamaCppLogits

        return LlamaCppLogits(path, ctx)
    from lowbit.formats.registry import load_artifact

    return load_artifact(path) if c.config.kind == "recipe" else None


def _evaluate(cells: list[Cell], ref: LoadedModel, m: Measure, windows: int, stage: str, progress: bool) -> None:
    """``stage`` (quality or proxy) of every cell lacking it, ``m.eval_group`` artifacts at a time beside the
    reference."""
    from lowbit.jobs.evaluate import evaluate_models

    todo = [c for c in cells if stage not in c.data]
    if not todo:
        return
    ref_cell = next((c for c in todo if c.config.kind == "reference"), None)
    others = [c for c in todo if c is not ref_cell]
    groups = [others[i:i + m.eval_group] for i in range(0, len(others), m.eval_group)] or [[]]
    for group in groups:
        models: dict[str, Any] = {"reference": ref.model}
        for c in group:
            models[c.config.name] = _load_for_eval(c, m.ctx)
            if c.config.kind == "gguf":
                models[c.config.name].check_tokenizer(ref.tokenizer)
        corpus, res = evaluate_models(models, ref.tokenizer, reference="reference", data=m.data, protocol=m.protocol,
                                      ctx=m.ctx, max_windows=windows, progress=progress)
        for c in group + ([ref_cell] if ref_cell is not None else []):
            r = res["reference" if c is ref_cell else c.config.name]
            c.save(**{stage: {"corpus": corpus, **r.to_dict()}})
        ref_cell = None
        for v in models.values():
            close = getattr(v, "close", None)
            if callable(close):
                close()


def _proxy(cells: list[Cell], ref: LoadedModel, m: Measure, opts: Options) -> None:
    _evaluate(cells, ref, m, 1, "proxy", opts.engine.progress)


def _candidates(cells: list[Cell], limits: Limits) -> list[Cell]:
    """The reference, the configs near the one-window size/KLD front, and those that meet the limits by proxy."""
    def kld(c: Cell) -> float:
        v = c.data["proxy"].get("kld_mean")
        return float("inf") if v is None else float(v)

    def size(c: Cell) -> int:
        return int(c.data["build"]["size_bytes"])

    ref_ppl = next(c.data["proxy"]["ppl"] for c in cells if c.config.kind == "reference")
    keep = []
    for c in cells:
        if c.config.kind == "reference":
            keep.append(c)
            continue
        dominated = any(o is not c and o.config.kind != "reference" and size(o) <= size(c)
                        and kld(o) * PROXY_SLACK < kld(c) for o in cells)
        row = {"size_bytes": size(c), "ppl_increase_pct": 100 * (c.data["proxy"]["ppl"] / ref_ppl - 1)}
        lim = Limits(limits.max_size, None, limits.max_ppl_increase, None)
        if not dominated or (limits != Limits() and not shortfalls(row, lim)):
            keep.append(c)
    log.info("fast strategy: %d of %d configs measured fully (%s)", len(keep), len(cells),
             ", ".join(c.config.name for c in keep))
    return keep


def _quality(cells: list[Cell], ref: LoadedModel, m: Measure, opts: Options, bar: Any) -> None:
    _evaluate(cells, ref, m, m.windows, "quality", opts.engine.progress)
    for _ in cells:
        bar.advance()


def _tasks(cells: list[Cell], ref: LoadedModel, m: Measure) -> None:
    from lowbit.eval.tasks import evaluate_tasks

    for c in cells:
        if "tasks" in c.data:
            continue
        model = ref.model if c.config.kind == "reference" else _load_for_eval(c, 2048)
        res = evaluate_tasks({c.config.name: model}, ref.tokenizer, list(m.tasks), limit=m.task_limit,
                             progress=False)
        # the report keeps each task's metrics and standard errors (per-document answers: lowbit eval --json)
        c.save(tasks={name: {t: {**r.metrics, "stderr": r.stderr, "n_docs": r.n_docs} for t, r in per.items()}
                      for name, per in res.items()})


def _speed(c: Cell, m: Measure, opts: Options) -> None:
    if "speed" in c.data:
        return
    s = run_speed(c.data["build"]["path"], c.config.family, device=opts.engine.resolved_device(),
                  threads=opts.engine.threads, n_prompt=m.n_prompt, n_gen=m.n_gen, reps=m.reps)
    c.save(speed=s.to_dict())


def _row(c: Cell, n_params: int, full: bool) -> dict[str, Any]:
    b = c.data["build"]
    q = c.data.get("quality") if full else c.data.get("proxy")
    s = c.data.get("speed") or {}
    row: dict[str, Any] = {
        "name": c.config.name, "kind": c.config.kind, "family": c.config.family, "recipe": b.get("recipe"),
        "path": b["path"], "size_bytes": b["size_bytes"], "bits_per_weight": 8 * b["size_bytes"] / n_params,
        "quantize_seconds": b["quantize_seconds"], "notes": b.get("notes", []),
        "measured": "full" if full and "quality" in c.data else "proxy",
        "engine": s.get("engine"), "kernel": s.get("kernel"), "dequantized": s.get("dequantized"),
        "prefill_tokens_per_s": s.get("prefill_tokens_per_s"), "decode_tokens_per_s": s.get("decode_tokens_per_s"),
        "peak_memory_bytes": s.get("peak_memory_bytes"), "load_seconds": s.get("load_seconds"),
        "tasks": (c.data.get("tasks") or {}).get(c.config.name) if full else None,
    }
    if q:
        ref = c.config.kind == "reference"  # its KL divergence to itself is 0, its top-1 agreement 1
        row.update(ppl=q["ppl"], kld=0.0 if ref else q.get("kld_mean"), top1=1.0 if ref else q.get("top1"),
                   corpus=q["corpus"], tokens_scored=q.get("n_tokens"))
    return row
