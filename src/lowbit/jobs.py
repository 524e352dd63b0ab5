"""The user-facing jobs behind the CLI: quantize a model to a folder, evaluate artifacts.

Evaluation always loads artifacts from disk (what we measure is what we ship).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import __version__
from lowbit.core.dtypes import DataTypeScheme
from lowbit.core.errors import DataError, LowbitError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.data import calibration_tokens, default_eval_corpus, resolve_calib_texts, resolve_eval_text
from lowbit.eval import EvalResult, adds_bos, evaluate, tokenize_corpus
from lowbit.eval.llamacpp import LlamaCppLogits
from lowbit.formats.compressed_tensors import RECIPE_FILE, load_quantized, save_quantized
from lowbit.methods.gptq import GPTQConfig
from lowbit.models.archs import get_arch
from lowbit.models.loader import LoadedModel, load_model, model_size_bytes
from lowbit.pipeline.distributed import shard, world
from lowbit.pipeline.estimate import check_fits, compute_rate, estimate_run
from lowbit.pipeline.gptq import GPTQMethod
from lowbit.pipeline.quantize import METHODS, check_group_size, make_method, named_linears, quantize_model

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QuantizeResult:
    path: Path
    scheme: QuantScheme | DataTypeScheme
    method: str
    seconds: float
    size_bytes: int
    bits_per_weight: float
    n_linears: int
    kept: list[str]


def bits_per_weight(qweights: dict[str, QuantizedWeight], scale_bits: int = 16) -> float:
    """Average storage bits per quantized weight: codes + scales (+ zero points when asymmetric)."""
    total_w = total_bits = 0
    for qw in qweights.values():
        out, inp = qw.shape
        g = qw.scales.shape[1]
        zbits = 0 if qw.scheme.symmetric else qw.scheme.bits
        total_w += out * inp
        total_bits += out * inp * qw.scheme.bits + out * g * (scale_bits + zbits)
    return total_bits / max(total_w, 1)


def default_calib() -> str:
    """``c4`` when the shared C4 sample is found, else CPython's docs (offline)."""
    try:
        resolve_calib_texts("c4")
        return "c4"
    except DataError:
        return "python-docs"


def quantize_loaded(lm: LoadedModel, scheme: QuantScheme | DataTypeScheme, out: str | Path, *, method: str = "rtn",
                    calib: str | None = None, calib_samples: int = 128, calib_len: int = 512,
                    search: bool = False, dtype: torch.dtype | None = None, device: str = "cpu",
                    force: bool = False, seed: int = 0, progress: bool = True,
                    gptq: GPTQConfig | None = None, true_sequential: bool = True,
                    hessians_on_cpu: bool = False, offload_activations: bool = False,
                    awq_save: str | Path | None = None, awq_load: str | Path | None = None,
                    export_format: str = "auto", alpha: float = 0.5, awq_clip: bool = False,
                    awq_objective: str = "parent", awq_options: dict[str, Any] | None = None) -> QuantizeResult:
    """Quantize an already loaded model (modified in place) and write the artifact to ``out``.

    ``awq_save`` writes the AWQ search result (scales, clips) to a file; ``awq_load`` applies a saved
    one instead of searching (methods ``awq`` and ``awq+gptq``). ``export_format`` ``awq`` writes the
    AutoAWQ GEMM layout (4-bit, grouped) instead of compressed-tensors. ``awq_options`` sets further
    :class:`~lowbit.pipeline.awq.AWQMethod` fields (``max_tokens``, ``duo_scaling``, ``grid``).
    """
    if export_format not in ("auto", "awq"):
        raise LowbitError(f"unknown export format {export_format!r}; use auto or awq")
    if export_format == "awq" and (isinstance(scheme, DataTypeScheme) or scheme.bits != 4 or scheme.group_size is None
                                   or scheme.act_bits):
        raise LowbitError(f"--format awq holds 4-bit grouped weights (e.g. --scheme W4A16_ASYM), not {scheme.label}")
    if not isinstance(scheme, DataTypeScheme) and scheme.act_bits:
        return _quantize_w8a8(lm, scheme, out, method=method, alpha=alpha, calib=calib, calib_samples=calib_samples,
                              calib_len=calib_len, dtype=dtype, device=device, force=force, seed=seed,
                              progress=progress)
    if method == "smoothquant":
        raise LowbitError(f"--method smoothquant goes with --scheme W8A8 or W8A8_STATIC, not {scheme.label}")
    if isinstance(scheme, DataTypeScheme):
        return _quantize_datatype(lm, scheme, out, calib=calib, calib_samples=calib_samples, calib_len=calib_len,
                                  dtype=dtype, device=device, force=force, seed=seed, progress=progress)
    if method not in METHODS:
        raise LowbitError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    store = _storage_dtype(lm, dtype)
    gptq = gptq or GPTQConfig(search=search)
    preset = None
    if awq_load is not None:
        from lowbit.pipeline.awq import AWQResult

        preset, saved = AWQResult.load(awq_load)
        if saved.with_options(name=None) != scheme.with_options(name=None):
            log.warning("AWQ result %s was searched for %s; applying it before %s", awq_load, saved.label,
                        scheme.label)
    if (awq_save or awq_load) and not method.startswith("awq"):
        raise LowbitError("--awq-save / --awq-load go with --method awq or awq+gptq")
    block_method = make_method(method, scheme, search=search, scale_dtype=store, gptq=gptq,
                               true_sequential=true_sequential, hessians_on_cpu=hessians_on_cpu,
                               awq_preset=preset, awq_clip=awq_clip,
                               awq_objective=awq_objective, awq_options=awq_options)
    spec = get_arch(lm.model)
    check_group_size(scheme, named_linears(lm.model, spec))  # before any calibration work
    tokens = None
    calib_info: dict[str, Any] = {}
    if block_method.needs_calibration:
        dev = torch.device(device)
        # the estimate's matmul rate is taken first: GPTQ's background warm-up would share the device
        # (and the GIL, while Triton compiles) with the timing loop and make the estimate pessimistic
        rate = compute_rate(dev, next(lm.model.parameters()).dtype)
        prepare = getattr(block_method, "prepare", None)
        if prepare is not None:  # GPTQ compiles its GPU kernels in the background while the text is read
            prepare(dev)
        calib = calib or default_calib()
        texts = resolve_calib_texts(calib)
        tokens = shard(calibration_tokens(lm.tokenizer, texts, calib_samples, calib_len, seed=seed))
        calib_info = {"calib": calib, "calib_samples": calib_samples, "calib_len": calib_len, "seed": seed}
        est = estimate_run(lm.model, spec, block_method, tokens.shape[0], calib_len, dev, rate=rate,
                           offload=offload_activations)
        log.info(est.describe())
        check_fits(est, dev)
    t0 = time.perf_counter()
    qweights = quantize_model(lm.model, scheme, block_method, tokens=tokens, device=device, progress=progress,
                              offload_activations=offload_activations)
    seconds = time.perf_counter() - t0
    recipe = {"lowbit_version": __version__, "method": method, "search": search or method == "imatrix-rtn",
              "source_model": str(lm.path), "storage_dtype": str(store).removeprefix("torch."),
              "quantize_seconds": round(seconds, 2), **calib_info}
    actorder = None
    from lowbit.pipeline.awq import AWQMethod

    if isinstance(block_method, AWQMethod):
        res = block_method.preset or block_method.result
        recipe["awq"] = {"alphas": res.alphas, "clipped_linears": len(res.clips), "loaded_from": str(awq_load)
                         if awq_load else None, "objective": block_method.objective,
                         "max_tokens": block_method.max_tokens, "duo_scaling": block_method.duo_scaling}
        if awq_save and world()[0] == 0:
            block_method.result.save(awq_save, scheme)
            log.info("AWQ search result written to %s", awq_save)
        if isinstance(block_method.inner, GPTQMethod):
            block_method = block_method.inner
    if isinstance(block_method, GPTQMethod):
        recipe["gptq"] = {**asdict(gptq), "true_sequential": true_sequential}
        recipe["gptq_layer_loss"] = {n: st.loss for n, st in block_method.stats.items()}
        raised = {n: st.damp for n, st in block_method.stats.items() if st.damp != gptq.damp}
        if raised:
            recipe["gptq_damp_raised"] = raised
        losses = [st.loss for st in block_method.stats.values()]
        log.info("GPTQ: %d layers, loss mean %.4g, max %.4g; damp raised on %d", len(losses),
                 sum(losses) / len(losses), max(losses), len(raised))
        if gptq.act_order:
            actorder = "weight" if gptq.static_groups else "group"
    rank, size = world()
    if size > 1:
        recipe["world_size"] = size
    if rank == 0 and export_format == "awq":
        from lowbit.formats.awq_gemm import save_awq_gemm

        save_awq_gemm(lm.model, qweights, out, tokenizer=lm.tokenizer, recipe={"scheme": scheme.to_dict(), **recipe},
                      overwrite=force)
    elif rank == 0:
        save_quantized(lm.model, qweights, out, tokenizer=lm.tokenizer, recipe=recipe, dtype=store,
                       overwrite=force, actorder=actorder)
    return _result(lm, out, scheme, method, seconds, qweights, bits_per_weight(qweights))


def _storage_dtype(lm: LoadedModel, dtype: torch.dtype | None) -> torch.dtype:
    """Dtype of scales and unquantized tensors: ``dtype``, else the checkpoint's (bf16 for float32 ones)."""
    return dtype or (lm.storage_dtype if lm.storage_dtype != torch.float32 else torch.bfloat16)


def _result(lm: LoadedModel, out: str | Path, scheme: QuantScheme | DataTypeScheme, method: str, seconds: float,
            weights: dict[str, Any], bpw: float) -> QuantizeResult:
    """Wait for rank 0's write (under torchrun), then describe the artifact at ``out``."""
    if world()[1] > 1:
        torch.distributed.barrier()
    path = Path(out)
    kept = sorted(n for n, m in lm.model.named_modules() if isinstance(m, nn.Linear) and n not in weights)
    return QuantizeResult(path, scheme, method, seconds, model_size_bytes(path), bpw, len(weights), kept)


def _calibration(lm: LoadedModel, needed: bool, calib: str | None, samples: int, length: int, seed: int
                 ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """This rank's calibration tokens and their recipe entry, or ``(None, {})`` when not ``needed``."""
    if not needed:
        return None, {}
    calib = calib or default_calib()
    tokens = shard(calibration_tokens(lm.tokenizer, resolve_calib_texts(calib), samples, length, seed=seed))
    return tokens, {"calib": calib, "calib_samples": samples, "calib_len": length, "seed": seed}


def _quantize_w8a8(lm: LoadedModel, scheme: QuantScheme, out: str | Path, *, method: str, alpha: float,
                   calib: str | None, calib_samples: int, calib_len: int, dtype: torch.dtype | None, device: str,
                   force: bool, seed: int, progress: bool) -> QuantizeResult:
    """W8A8 (int8 weights per channel, int8 activations): plain RTN or SmoothQuant, compressed-tensors int-quantized."""
    from lowbit.formats.ct_int8 import save_w8a8
    from lowbit.pipeline.smoothquant import SmoothQuantMethod

    if method not in ("rtn", "smoothquant"):
        raise LowbitError(f"{scheme.name or scheme.label} takes --method rtn or smoothquant, not {method!r}")
    store = _storage_dtype(lm, dtype)
    block_method: Any
    if method == "smoothquant" or scheme.act_strategy == "tensor":
        block_method = SmoothQuantMethod(scheme, alpha=alpha if method == "smoothquant" else None, scale_dtype=store)
    else:
        block_method = make_method("rtn", scheme, scale_dtype=store)
    tokens, calib_info = _calibration(lm, block_method.needs_calibration, calib, calib_samples, calib_len, seed)
    t0 = time.perf_counter()
    qweights = quantize_model(lm.model, scheme, block_method, tokens=tokens, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    recipe: dict[str, Any] = {"lowbit_version": __version__, "method": method, "source_model": str(lm.path),
                              "storage_dtype": str(store).removeprefix("torch."),
                              "quantize_seconds": round(seconds, 2), **calib_info}
    if method == "smoothquant":
        recipe["alpha"] = alpha
        recipe["smoothed_groups"] = len(block_method.smooth_scales)
    rank = world()[0]
    if rank == 0:
        save_w8a8(lm.model, qweights, out, scheme=scheme, tokenizer=lm.tokenizer, recipe=recipe, dtype=store,
                  overwrite=force, input_scales=getattr(block_method, "input_scales", None) or None)
    return _result(lm, out, scheme, method, seconds, qweights, bits_per_weight(qweights))


def _quantize_datatype(lm: LoadedModel, scheme: DataTypeScheme, out: str | Path, *, calib: str | None,
                       calib_samples: int, calib_len: int, dtype: torch.dtype | None, device: str, force: bool,
                       seed: int, progress: bool) -> QuantizeResult:
    """NF4/FP4/LLM.int8 to a bitsandbytes folder, FP8 to a compressed-tensors float-quantized folder."""
    from lowbit.formats.bitsandbytes import save_bnb
    from lowbit.formats.ct_float import save_fp8
    from lowbit.pipeline.datatypes import DataTypeMethod

    store = _storage_dtype(lm, dtype)
    method = DataTypeMethod(scheme, scale_dtype=store)
    tokens, calib_info = _calibration(lm, method.needs_calibration, calib, calib_samples, calib_len, seed)
    t0 = time.perf_counter()
    weights: dict[str, Any] = quantize_model(lm.model, None, method, tokens=tokens,  # type: ignore[arg-type]
                                             device=device, progress=progress)
    seconds = time.perf_counter() - t0
    recipe: dict[str, Any] = {"lowbit_version": __version__, "method": scheme.dtype, "source_model": str(lm.path),
                              "storage_dtype": str(store).removeprefix("torch."),
                              "quantize_seconds": round(seconds, 2), **calib_info}
    if method.outlier_columns:
        recipe["int8_outlier_columns"] = method.outlier_columns
        log.info("LLM.int8: %d calibrated outlier columns over %d layers (threshold %g)",
                 sum(method.outlier_columns.values()), len(method.outlier_columns), scheme.threshold)
    rank = world()[0]
    if rank == 0:
        save = save_fp8 if scheme.dtype == "fp8_e4m3" else save_bnb
        save(lm.model, weights, out, scheme=scheme, tokenizer=lm.tokenizer, recipe=recipe, dtype=store,
             overwrite=force)
    total = sum(w.shape[0] * w.shape[1] for w in weights.values())
    bpw = sum(w.shape[0] * w.shape[1] * scheme.bits_per_weight(w.shape[1], w.shape[0])
              for w in weights.values()) / max(total, 1)
    return _result(lm, out, scheme, scheme.dtype, seconds, weights, bpw)


def quantize(model: str, scheme: QuantScheme | DataTypeScheme, out: str | Path, **kw: Any) -> QuantizeResult:
    """Load ``model`` (source name, folder, GGUF or hub id), quantize it, write ``out``."""
    device = kw.get("device", "cpu")
    # weights live on the CPU and visit the device block by block: bf16 compute on accelerators
    lm = load_model(model, device="cpu", dtype=None if torch.device(device).type == "cpu" else torch.bfloat16)
    return quantize_loaded(lm, scheme, out, **kw)


def artifact_kind(path: str | Path) -> str | None:
    """``pack-quantized``, ``float8`` (compressed-tensors), ``bitsandbytes``, ``awq`` (GEMM) or None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    config = json.loads(cfg.read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "bitsandbytes":
        return "bitsandbytes"
    if qc.get("quant_method") == "awq":
        return "awq"
    if qc.get("quant_method") == "compressed-tensors":
        from lowbit.formats.ct_float import is_fp8_artifact
        from lowbit.formats.ct_int8 import is_w8a8_artifact

        if is_w8a8_artifact(config):
            return "w8a8"
        return "float8" if is_fp8_artifact(config) else "pack-quantized"
    return None


def is_quantized_artifact(path: str | Path) -> bool:
    return artifact_kind(path) is not None


def load_artifact(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A lowbit artifact folder of any format, with lowbit's runtime modules."""
    kind = artifact_kind(path)
    if kind == "bitsandbytes":
        from lowbit.formats.bitsandbytes import load_bnb

        return load_bnb(path, dtype=dtype)[0]
    if kind == "w8a8":
        from lowbit.formats.ct_int8 import load_w8a8

        return load_w8a8(path, dtype=dtype)[0]
    if kind == "awq":
        from lowbit.formats.awq_gemm import load_awq_gemm

        return load_awq_gemm(path, dtype=dtype)[0]
    if kind == "float8":
        from lowbit.formats.ct_float import load_fp8

        return load_fp8(path, dtype=dtype)[0]
    return load_quantized(path, dtype=dtype)[0]


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
    if is_quantized_artifact(spec):
        from transformers import AutoTokenizer

        return load_artifact(spec), AutoTokenizer.from_pretrained(str(spec))
    lm = load_model(str(spec))
    return lm.model, lm.tokenizer


def eval_text(data: str | None) -> tuple[str, str]:
    return resolve_eval_text(data or default_eval_corpus())


def evaluate_models(models: dict[str, nn.Module], tokenizer: Any, *, reference: str | None, data: str | None,
                    protocol: str = "gptq", ctx: int = 2048, max_windows: int | None = None,
                    progress: bool = True) -> tuple[str, dict[str, EvalResult]]:
    """Evaluate models sharing ``tokenizer`` on one corpus; returns (corpus label, results)."""
    if protocol not in ("gptq", "llamacpp"):
        raise LowbitError(f"unknown protocol {protocol!r}; use 'gptq' or 'llamacpp'")
    label, text = eval_text(data)
    if protocol == "llamacpp" and label == "wikitext2":
        from lowbit.data import wikitext2_test

        text = wikitext2_test(raw=True)  # llama-perplexity reads the raw file
    ids = tokenize_corpus(tokenizer, text)
    bos = adds_bos(tokenizer) if protocol == "llamacpp" else None
    res = evaluate(models, ids, protocol, ctx, max_windows, reference=reference,  # type: ignore[arg-type]
                   progress=progress, bos_token_id=bos)
    return label, res


def recipe_of(path: str | Path) -> dict[str, Any]:
    f = Path(path) / RECIPE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
