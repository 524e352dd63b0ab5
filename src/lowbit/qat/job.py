"""The QAT job: a model and a recipe in, a trained, exported and (optionally) gated artifact out.

    check every input (output folder, recipe, corpora, gate)       before any model loads
    load the model twice: the student and the float teacher
    prepare: the recipe's PTQ method, then fake-quant linears      (lowbit.qat.prepare)
    training windows, checked disjoint from the evaluation text    (lowbit.qat.data)
    optionally block by block: each block against the float block  (lowbit.qat.blocks)
    train: KD or next-token loss, AdamW, checkpoints               (lowbit.qat.train)
    convert through the exporters, gated if thresholds are given   (lowbit.qat.convert, lowbit.jobs.gate)

The artifact holds ``recipe.yaml`` (the PTQ recipe QAT started from), ``provenance.json`` (with a ``qat``
section: configuration, data, overlap check, losses, timings), ``qat.json`` (the same section) and
``qat_log.jsonl`` (one line per step). :func:`run` is also what ``lowbit compare`` calls for ``+qat`` configs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.io import check_output_dir
from lowbit.data import calibration_tokens, resolve_calib_texts
from lowbit.jobs.gate import Gate, check_gate, gated
from lowbit.jobs.provenance import SourceChecksum, record, source_name
from lowbit.jobs.quantization import bits_per_weight, needs_calibration, resolve_calibration
from lowbit.models.loader import LoadedModel, check_spec, load_model, model_size_bytes
from lowbit.pipeline.engine import Engine
from lowbit.qat.blocks import BlockConfig, train_blocks
from lowbit.qat.convert import convert, qweights
from lowbit.qat.data import check_disjoint, overlap
from lowbit.qat.fakequant import freeze_all_codes
from lowbit.qat.prepare import INITS, check_recipe, prepare, qat_state
from lowbit.qat.train import TrainConfig, train
from lowbit.recipe.schema import Recipe

log = logging.getLogger(__name__)

QAT_FILE = "qat.json"
LOG_FILE = "qat_log.jsonl"


@dataclass(frozen=True)
class QATConfig:
    """A QAT run: the training loop's settings and its data. ``corpus``: training text (None: C4, as calibration);
    ``samples`` windows of ``seq_len`` tokens are drawn from it (seeded by ``train.seed``); ``eval_data``: the
    text the result is evaluated on, which the training windows must not overlap by more than ``max_overlap``
    (None: the gate's corpus, else the default evaluation corpus)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    blocks: BlockConfig = field(default_factory=lambda: BlockConfig(epochs=0))
    corpus: str | None = None
    samples: int = 512
    seq_len: int = 256
    train_weights: bool = True  # end to end; False: codes frozen after the block phase, scales/zeros train
    init: str = "auto"
    eval_data: str | None = None
    max_overlap: float = 0.01

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise LowbitError(f"samples ({self.samples}) must be >= 1 and seq_len ({self.seq_len}) >= 2")
        if self.init not in INITS:
            raise LowbitError(f"init must be one of {INITS}, got {self.init!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        d["blocks"] = self.blocks.to_dict()
        return d


@dataclass
class QATResult:
    """What a QAT job wrote and measured. ``gate``: the gate's report (None without thresholds)."""

    path: Path
    recipe: Recipe
    config: QATConfig
    seconds: float
    ptq_seconds: float
    train_seconds: float
    steps: int
    loss_first: float | None
    loss_last: float | None
    size_bytes: int
    bits_per_weight: float
    n_linears: int
    kept: list[str]
    overlap: dict[str, Any]
    gate: dict[str, Any] | None
    record: dict[str, Any]


def checkpoint_dir(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoints (``OUT.checkpoint``)."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoint"


def _load(model: str | Path | LoadedModel) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(str(model), device="cpu", dtype=torch.float32)


def run(model: str | Path | LoadedModel, recipe: Recipe, out: str | Path, config: QATConfig | None = None, *,
        gate: Gate | None = None, engine: Engine | None = None, force: bool = False, resume: bool = False,
        progress: bool = True) -> QATResult:
    """Quantize ``model`` by ``recipe``, train it by ``config``, and write the artifact to ``out`` (see the module
    docstring). ``resume`` continues from ``OUT.checkpoint`` when a checkpoint of the same run is there.
    Raises :class:`lowbit.jobs.gate.GateFailed` when the artifact misses a threshold of ``gate``."""
    from lowbit.jobs.evaluate import eval_text

    config = config or QATConfig()
    gate = gate or Gate()
    engine = engine or Engine(device="cpu", progress=progress)
    t0 = time.perf_counter()
    if not isinstance(model, LoadedModel):
        check_spec(model)
    check_recipe(recipe)
    check_output_dir(out, force)
    engine.resolved_device()  # an absent GPU is reported before the model loads
    check_gate(gate)
    train_texts = resolve_calib_texts(config.corpus or "c4")
    eval_label, eval_str = eval_text(config.eval_data or gate.data)
    if needs_calibration(recipe):
        resolve_calibration(recipe)
    if isinstance(model, LoadedModel):  # the caller's model stays as it is: it is the teacher, a copy trains
        lm, teacher = copy.deepcopy(model), model.model.eval()
    else:
        lm = _load(model)
        teacher = _load(model).model.eval()
    checksum = SourceChecksum(Path(lm.path))
    # the overlap is counted in tokens, so it needs the tokenizer; it is refused before the PTQ and the training
    tokens = calibration_tokens(lm.tokenizer, train_texts, config.samples, config.seq_len, seed=config.train.seed)
    from lowbit.eval import tokenize_corpus

    ov = overlap(tokens, tokenize_corpus(lm.tokenizer, eval_str), config.corpus or "c4", eval_label)
    check_disjoint(ov, config.max_overlap)
    cal: torch.Tensor | None = None
    if needs_calibration(recipe):
        recipe, texts, _ = resolve_calibration(recipe)
        c = recipe.calibration
        assert c.length is not None
        cal = calibration_tokens(lm.tokenizer, texts, c.samples, c.length, seed=c.seed)
    # the block-wise phase trains the latent weights; without train_weights the codes freeze after it
    prepare(lm.model, recipe, tokens=cal, train_weights=config.train_weights or config.blocks.epochs > 0,
            init=config.init, engine=engine)
    st = qat_state(lm.model)
    dev = torch.device(engine.resolved_device())
    lm.model.to(dev)
    teacher.to(dev)
    if resume and config.blocks.epochs:
        log.warning("--resume continues the end-to-end phase; the block-wise phase runs again (it is deterministic)")
    log.info("training text %s vs evaluation text %s: %d of %d %d-grams shared (%.3f%%)", ov.train_corpus,
             ov.eval_corpus, ov.shared, ov.train_ngrams, ov.n, 100 * ov.fraction)
    blk = train_blocks(lm.model, teacher, tokens, config.blocks, progress=progress)
    if not config.train_weights:
        freeze_all_codes(lm.model)  # end to end only the scales and zero points train (E2E-QP)
    ckdir = checkpoint_dir(out)
    res = train(lm.model, tokens, config.train, teacher=teacher if config.train.loss == "kd" else None,
                checkpoint_dir=ckdir if config.train.checkpoint_every or resume else None, resume=resume,
                progress=progress)
    lm.model.to("cpu")
    teacher.to("cpu")
    weights = qweights(lm.model)
    section = {"config": config.to_dict(), "train_corpus": ov.train_corpus, "train_windows": list(tokens.shape),
               "overlap": ov.to_dict(), "init": st.init, "ptq_seconds": round(st.ptq_seconds, 2),
               "block_seconds": round(blk.seconds, 2), "block_steps": blk.steps_per_block, "blocks": blk.blocks,
               "train_seconds": round(res.seconds, 2), "steps": res.steps, "resumed_from": res.resumed_from,
               "loss_first10": res.mean_loss(True), "loss_last10": res.mean_loss(False)}
    rec = record(source_name(str(model) if not isinstance(model, LoadedModel) else lm.name, Path(lm.path)),
                 checksum.result(), time.perf_counter() - t0, engine.resolved_device(), {"qat": section})
    files = {QAT_FILE: json.dumps(section, indent=2) + "\n",
             LOG_FILE: "".join(json.dumps(e) + "\n" for e in res.log)}
    _, report = gated(out, gate, lambda p: convert(lm.model, p, tokenizer=lm.tokenizer, record=rec, files=files,
                                                   force=force),
                      lambda: (teacher, lm.tokenizer), force=force, progress=progress)
    shutil.rmtree(ckdir, ignore_errors=True)  # the run is complete; its log is in the artifact
    return QATResult(Path(out), st.recipe, config, time.perf_counter() - t0, st.ptq_seconds, res.seconds, res.steps,
                     res.mean_loss(True), res.mean_loss(False), model_size_bytes(out), bits_per_weight(weights),
                     len(weights), st.kept, ov.to_dict(), report, rec)
