"""The method registry: config type -> block method. Adding a method touches this folder only.

Each entry names a method (as recipes and the CLI spell it), its frozen config class, the kinds of
scheme it quantizes, and how to build its block method for one scheme. Scheme kinds:

========== =================================================================
``int``    integer weight-only grids (W8A16, W4A16, W3A16 ..., QuantScheme)
``w8a8``   int8 weights and activations (W8A8, W8A8_STATIC)
``dtype``  number formats (NF4, FP4, INT8-LLM, FP8, DataTypeScheme)
========== =================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import SchemeError
from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline.awq import AWQConfig, AWQMethod, AWQResult
from lowbit.pipeline.blockwise import BlockMethod
from lowbit.pipeline.datatypes import DataTypeMethod
from lowbit.pipeline.engine import Engine
from lowbit.pipeline.gptq import GPTQMethod
from lowbit.pipeline.rtn import ImatrixConfig, ImatrixRTNMethod, RTNConfig, RTNMethod
from lowbit.pipeline.smoothquant import SmoothQuantConfig, SmoothQuantMethod

Scheme = QuantScheme | DataTypeScheme
KIND_EXAMPLES = {"int": "integer (W4A16, W8A16 ...)", "w8a8": "W8A8 / W8A8_STATIC",
                 "dtype": "NF4 / FP4 / INT8-LLM / FP8"}
Build = Callable[[Any, Any, torch.dtype, Engine], BlockMethod]


def scheme_kind(scheme: Scheme) -> str:
    """``int``, ``w8a8`` or ``dtype`` (see the module docstring)."""
    if isinstance(scheme, DataTypeScheme):
        return "dtype"
    return "w8a8" if scheme.act_bits else "int"


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: type
    kinds: frozenset[str]
    build: Build
    summary: str


def _rtn(cfg: RTNConfig, scheme: Scheme, dtype: torch.dtype, engine: Engine) -> BlockMethod:
    if isinstance(scheme, DataTypeScheme):
        if cfg.search:
            raise SchemeError(f"{scheme.label} has its own rounding: the RTN clipping search does not apply")
        return DataTypeMethod(scheme, scale_dtype=dtype)
    if scheme.act_bits and scheme.act_strategy == "tensor":  # static activation scales need calibration
        return SmoothQuantMethod(scheme, alpha=None, scale_dtype=dtype)
    return RTNMethod(scheme, search=cfg.search, scale_dtype=dtype)


def _imatrix(cfg: ImatrixConfig, scheme: Scheme, dtype: torch.dtype, engine: Engine) -> BlockMethod:
    return ImatrixRTNMethod(scheme, scale_dtype=dtype, propagate=cfg.propagate)  # type: ignore[arg-type]


def _gptq(cfg: GPTQConfig, scheme: Scheme, dtype: torch.dtype, engine: Engine) -> BlockMethod:
    return GPTQMethod(scheme, cfg, true_sequential=cfg.true_sequential,  # type: ignore[arg-type]
                      hessians_on_cpu=engine.hessians_on_cpu, scale_dtype=dtype)


def _awq(cfg: AWQConfig, scheme: Scheme, dtype: torch.dtype, engine: Engine) -> BlockMethod:
    inner = None
    if isinstance(cfg.inner, GPTQConfig):
        inner = _gptq(cfg.inner, scheme, dtype, engine)
    elif cfg.inner is not None and not isinstance(cfg.inner, RTNConfig):
        raise SchemeError(f"AWQ's inner method is rtn or gptq, not {type(cfg.inner).__name__}")
    search = isinstance(cfg.inner, RTNConfig) and cfg.inner.search
    if search:
        raise SchemeError("AWQ quantizes the scaled block by plain RTN: its clip search (clip: true) replaces "
                          "RTN's MSE search; drop inner.search")
    preset = None
    if cfg.preset is not None:
        preset, _ = AWQResult.load(cfg.preset)
    return AWQMethod(scheme, grid=cfg.grid, duo_scaling=cfg.duo_scaling, clip=cfg.clip,  # type: ignore[arg-type]
                     objective=cfg.objective, max_tokens=cfg.max_tokens, propagate=cfg.propagate,
                     clip_tokens=cfg.clip_tokens, scale_dtype=dtype, inner=inner, preset=preset)


def _smoothquant(cfg: SmoothQuantConfig, scheme: Scheme, dtype: torch.dtype, engine: Engine) -> BlockMethod:
    if cfg.inner is not None and not isinstance(cfg.inner, GPTQConfig):
        raise SchemeError(f"SmoothQuant's inner method is gptq or none (RTN), not {type(cfg.inner).__name__}")
    inner = None if cfg.inner is None else _gptq(cfg.inner, scheme, dtype, engine)
    return SmoothQuantMethod(scheme, alpha=cfg.alpha, scale_dtype=dtype, inner=inner)  # type: ignore[arg-type]


METHODS: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("rtn", RTNConfig, frozenset({"int", "w8a8", "dtype"}), _rtn,
                "round to nearest (data types: their own rounding); no calibration"),
    MethodEntry("imatrix-rtn", ImatrixConfig, frozenset({"int"}), _imatrix,
                "RTN with the clipping search weighted by E[x^2] (llama.cpp's imatrix idea)"),
    MethodEntry("gptq", GPTQConfig, frozenset({"int"}), _gptq,
                "GPTQ with act-order and asymmetric calibration (GPTAQ)"),
    MethodEntry("awq", AWQConfig, frozenset({"int"}), _awq,
                "activation-aware scales folded into the feeding module, then RTN or GPTQ"),
    MethodEntry("smoothquant", SmoothQuantConfig, frozenset({"w8a8"}), _smoothquant,
                "outliers migrated into the weights, int8 weights and activations"),
)}
#: other spellings of a method name (CLI and older recipes)
ALIASES = {"imatrix": "imatrix-rtn", "awq-rtn": "awq"}


def entry_for(config: Any) -> MethodEntry:
    """The registry entry of a method config instance."""
    for e in METHODS.values():
        if type(config) is e.config:
            return e
    raise SchemeError(f"{type(config).__name__} is not a registered method config; known: "
                      f"{', '.join(e.config.__name__ for e in METHODS.values())}")


def method_entry(name: str) -> MethodEntry:
    """The registry entry of a method name (or alias)."""
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise SchemeError(f"unknown method {name!r}; known methods: {', '.join(METHODS)} (and awq+gptq)")
    return METHODS[key]


def build_method(config: Any, scheme: Scheme, scale_dtype: torch.dtype, engine: Engine | None = None
                 ) -> BlockMethod:
    """The block method of ``config`` for ``scheme``; refuses a scheme kind the method cannot produce."""
    e = entry_for(config)
    kind = scheme_kind(scheme)
    if kind not in e.kinds:
        fits = [m.name for m in METHODS.values() if kind in m.kinds]
        raise SchemeError(f"method {e.name} does not quantize {scheme.label}: {e.name} takes "
                          f"{' or '.join(KIND_EXAMPLES[k] for k in sorted(e.kinds))} schemes; {scheme.label} takes "
                          f"--method {' or '.join(fits)}")
    return e.build(config, scheme, scale_dtype, engine or Engine())
