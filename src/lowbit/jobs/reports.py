"""What each block method reports after a run, for the provenance record and the artifact's writer."""

from __future__ import annotations

import logging
from typing import Any

from lowbit.pipeline.awq import AWQMethod
from lowbit.pipeline.datatypes import DataTypeMethod
from lowbit.pipeline.distributed import world
from lowbit.pipeline.engine import Engine
from lowbit.pipeline.gptq import GPTQMethod
from lowbit.pipeline.registry import entry_for
from lowbit.pipeline.smoothquant import SmoothQuantMethod
from lowbit.recipe.plan import Plan

log = logging.getLogger(__name__)


def _gptq(m: GPTQMethod) -> dict[str, Any]:
    raised = {n: st.damp for n, st in m.stats.items() if st.damp != m.config.damp}
    losses = [st.loss for st in m.stats.values()]
    if losses:
        log.info("GPTQ: %d layers, loss mean %.4g, max %.4g; damp raised on %d", len(losses),
                 sum(losses) / len(losses), max(losses), len(raised))
    return {"layer_loss": {n: st.loss for n, st in m.stats.items()}, "damp_raised": raised}


def method_reports(plan: Plan, engine: Engine) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({method name: report}, writer options)``; writes AWQ's search result where the engine asks."""
    reports: dict[str, Any] = {}
    opts: dict[str, Any] = {}
    for cfg, m in plan.methods.items():
        name = entry_for(cfg).name
        rep: dict[str, Any] = {}
        inner = getattr(m, "inner", None)  # AWQ and SmoothQuant hand the weights to an inner method
        gq = m if isinstance(m, GPTQMethod) else inner if isinstance(inner, GPTQMethod) else None
        if gq is not None:
            rep["gptq"] = _gptq(gq)
            if gq.config.act_order:
                opts["actorder"] = "weight" if gq.config.static_groups else "group"
        if isinstance(m, AWQMethod):
            res = m.preset or m.result
            rep["awq"] = {"alphas": res.alphas, "clipped_linears": len(res.clips)}
            if engine.save_search and world()[0] == 0 and m.preset is None:
                m.result.save(engine.save_search, m.scheme)
                log.info("AWQ search result written to %s", engine.save_search)
        if isinstance(m, SmoothQuantMethod):
            rep["smoothed_groups"] = len(m.smooth_scales)
            if m.input_scales:
                opts["input_scales"] = m.input_scales
        if isinstance(m, DataTypeMethod) and m.outlier_columns:
            rep["int8_outlier_columns"] = m.outlier_columns
            log.info("LLM.int8: %d calibrated outlier columns over %d layers (threshold %g)",
                     sum(m.outlier_columns.values()), len(m.outlier_columns), m.scheme.threshold)
        reports[name] = rep
    return reports, opts
