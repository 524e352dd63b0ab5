"""``lowbit quantize``: flags or a recipe file become one :class:`~lowbit.recipe.Recipe`.

Recipe flags default to "unset" (None): with ``--recipe`` only the flags given change the recipe, and
each change is logged; without it, unset flags take the recipe's defaults. Engine flags (device,
offload, threads) never enter the recipe.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from lowbit.cli.common import say, sub
from lowbit.cli.gate_flags import add_gate_args, describe, gate_from_args
from lowbit.core.errors import LowbitError
from lowbit.core.presets import PRESET_NAMES

log = logging.getLogger(__name__)

EXAMPLES = """\
  lowbit quantize smollm2-135m --scheme W4A16 --group-size 64 -o out/smol-w4
  lowbit quantize qwen2.5-coder-0.5b --scheme W4A16 --method gptq --calib c4 -o out/qwen-w4
  lowbit quantize gemma3-270m --scheme NF4 -o out/gemma-nf4
  lowbit quantize ./my-model --recipe recipe.yaml -o out/my-w4        # a lowbit or llm-compressor recipe
  lowbit quantize ./my-model --recipe out/qwen-w4/recipe.yaml -o out/again   # replay: identical weights
  lowbit quantize ./my-model --scheme W4A16 --method gptq --override 're:.*down_proj=W8A16' --ignore \\
      model.layers.0.self_attn.q_proj -o out/mixed"""

METHODS = ("rtn", "imatrix-rtn", "gptq", "awq", "awq+gptq", "smoothquant")
# flag dest -> (methods it belongs to, config field, transform)
_METHOD_FLAGS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "mse": (("rtn", "gptq", "awq+gptq"), "search", None),
    "damp": (("gptq", "awq+gptq"), "damp", None),
    "block_size": (("gptq", "awq+gptq"), "block_size", None),
    "act_order": (("gptq", "awq+gptq"), "act_order", None),
    "dynamic_groups": (("gptq", "awq+gptq"), "static_groups", lambda v: not v),
    "refit": (("gptq", "awq+gptq"), "refit", None),
    "asym_alpha": (("gptq", "awq+gptq"), "asym_alpha", None),
    "asym_scope": (("gptq", "awq+gptq"), "asym_scope", None),
    "mse_power": (("gptq", "awq+gptq"), "search_power", None),
    "mse_guard": (("gptq", "awq+gptq"), "search_guard", None),
    "no_true_sequential": (("gptq", "awq+gptq"), "true_sequential", lambda v: not v),
    "awq_clip": (("awq", "awq+gptq"), "clip", None),
    "awq_objective": (("awq", "awq+gptq"), "objective", None),
    "awq_tokens": (("awq", "awq+gptq"), "max_tokens", None),
    "awq_load": (("awq", "awq+gptq"), "preset", None),
    "alpha": (("smoothquant",), "alpha", None),
}


def register(subs: Any) -> dict[str, Any]:
    q = sub(subs, "quantize", "quantize a model into an artifact folder (compressed-tensors, bitsandbytes, AWQ)",
            EXAMPLES)
    q.add_argument("model", help="offline source name (lowbit models), model folder, .gguf file or hub id")
    q.add_argument("-o", "--out", required=True, help="output folder (absent or empty; --force replaces an artifact)")
    q.add_argument("--force", action="store_true", help="replace an existing lowbit artifact at --out")
    add_recipe_args(q)
    add_gate_args(q)
    e = q.add_argument_group("engine (how the run goes; never what it produces)")
    e.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda, cuda:1 ...")
    e.add_argument("--offload-activations", action="store_true", help="calibration activations in host memory")
    e.add_argument("--hessians-on-cpu", action="store_true", help="GPTQ Hessians in host memory")
    e.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    e.add_argument("--awq-save", default=None, help="also write the AWQ search result (scales, clips) to this file")
    e.add_argument("--resume", action="store_true", help="continue a killed calibrated run (GPTQ, AWQ ...) from its "
                   "last finished block; same command otherwise. The result is byte-identical")
    e.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="save each finished block of a calibrated run so --resume can continue it (default: on on "
                        "a CPU; off on a GPU, where saving each block's activations costs more than a rerun)")
    from lowbit.cli.mixed_flags import add_budget_flags

    add_budget_flags(q, "int")
    return {"quantize": cmd_quantize}


def add_recipe_args(q: argparse.ArgumentParser) -> None:
    """The recipe flags (shared with ``lowbit qat``)."""
    r = q.add_argument_group("recipe (what the artifact is; stored in it as recipe.yaml)")
    r.add_argument("--recipe", default=None, help="recipe file (lowbit YAML/JSON or llm-compressor YAML); the flags "
                                                  "below change its fields")
    r.add_argument("--scheme", default=None, help=f"one of {', '.join(PRESET_NAMES)}")
    r.add_argument("--group-size", type=int, default=None, help="group size, -1 per-channel (default: the "
                   "scheme's); NF4/FP4: absmax block (64); FP8: N for NxN blocks (default per-channel)")
    r.add_argument("--method", default=None, choices=METHODS, help="quantization method (default rtn)")
    r.add_argument("--calib", default=None, help="calibration text: c4 | c4:PATH | python-docs | PATH (.txt, .jsonl, "
                   ".parquet) | hf:NAME[:CONFIG[:SPLIT]] (default c4)")
    r.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default 128)")
    r.add_argument("--calib-len", type=int, default=None, help="tokens per sequence (default 2048 gptq, 512 else)")
    r.add_argument("--seed", type=int, default=None, help="seed of the calibration sample (default 0)")
    r.add_argument("--mse", action="store_true", default=None, help="search each group's clipping range (MSE)")
    r.add_argument("--format", default=None, choices=["auto", "compressed-tensors", "awq", "bitsandbytes"],
                   help="artifact format (default auto: compressed-tensors; bitsandbytes for NF4/FP4/INT8-LLM)")
    r.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype of scales and unquantized tensors (default: the model's, bf16 for float32)")
    r.add_argument("--ignore", action="append", default=None, metavar="TARGET",
                   help="keep these layers 16-bit: a module name or re:PATTERN (repeatable)")
    r.add_argument("--override", action="append", default=None, metavar="TARGET=SCHEME",
                   help="give these layers another scheme, e.g. 're:.*down_proj=W8A16' (repeatable)")
    d = q.add_argument_group("data types (NF4, FP4, INT8-LLM, FP8, FP8_DYNAMIC)")
    d.add_argument("--double-quant", action="store_true", default=None, help="NF4/FP4: 8-bit absmax values")
    d.add_argument("--threshold", type=float, default=None, help="INT8-LLM: activation outlier threshold (6.0)")
    g = q.add_argument_group("GPTQ (--method gptq or awq+gptq)")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="columns by decreasing Hessian diagonal, static groups (default on)")
    g.add_argument("--dynamic-groups", action="store_true", default=None,
                   help="with --act-order: groups follow the permuted order (stores g_idx)")
    g.add_argument("--damp", type=float, default=None, help="dampening, fraction of the mean diagonal (0.01)")
    g.add_argument("--refit", action="store_true", default=None, help="refit group scales after GPTQ (codes fixed)")
    g.add_argument("--asym-alpha", type=float, default=None, metavar="ALPHA",
                   help="asymmetric calibration (GPTAQ) strength in [0, 1]; 0 = plain GPTQ (default 0.5)")
    g.add_argument("--asym-scope", choices=["all", "skip-last", "residual"], default=None,
                   help="groups aimed at the float output (default skip-last: all but down_proj)")
    g.add_argument("--mse-power", type=float, default=None, metavar="P", help="with --mse: importance exponent (1)")
    g.add_argument("--mse-guard", type=int, default=None, metavar="N",
                   help="with --mse: keep it per layer only if the worst of N top tokens does not grow (0: off)")
    g.add_argument("--block-size", type=int, default=None, help="GPTQ lazy-update block size (128)")
    g.add_argument("--no-true-sequential", action="store_true", default=None, help="one Hessian pass per block")
    w = q.add_argument_group("AWQ (--method awq or awq+gptq) and SmoothQuant")
    w.add_argument("--awq-load", default=None, help="apply a saved AWQ search result instead of searching")
    w.add_argument("--awq-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="AWQ's clipping search after the scales (default off)")
    w.add_argument("--awq-objective", default=None, choices=["parent", "linear"],
                   help="what the scale search minimises (default parent: the attention's / MLP's output)")
    w.add_argument("--awq-tokens", type=int, default=None, help="tokens the scale search scores (16384)")
    w.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength in [0, 1] (0.5)")


def _check_numbers(a: argparse.Namespace) -> None:
    for flag, v, lo in (("--calib-samples", a.calib_samples, 1), ("--calib-len", a.calib_len, 1),
                        ("--seed", a.seed, 0), ("--threads", a.threads, 1), ("--awq-tokens", a.awq_tokens, 1),
                        ("--block-size", a.block_size, 1), ("--mse-guard", a.mse_guard, 0)):
        if v is not None and v < lo:
            raise LowbitError(f"{flag} must be >= {lo}, got {v}")
    for flag, v in (("--alpha", a.alpha), ("--asym-alpha", a.asym_alpha)):
        if v is not None and not 0 <= v <= 1:
            raise LowbitError(f"{flag} must lie in [0, 1], got {v}")
    if a.damp is not None and not 0 < a.damp < 1:
        raise LowbitError(f"--damp must lie in (0, 1), got {a.damp}")


def recipe_from_args(a: argparse.Namespace) -> Any:
    """The recipe the flags describe (on top of ``--recipe`` when given); every change to a file's field is logged."""
    from lowbit.cli.recipe_flags import build_recipe

    _check_numbers(a)
    return build_recipe(a, _METHOD_FLAGS)


def cmd_quantize(a: argparse.Namespace) -> None:
    from lowbit.cli.mixed_flags import budget_of
    from lowbit.jobs.artifacts import load
    from lowbit.jobs.gate import gated
    from lowbit.jobs.quantization import quantize
    from lowbit.pipeline.engine import Engine

    budget = budget_of(a)
    recipe = _budgeted_recipe(a, budget) if budget is not None else recipe_from_args(a)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.resume and a.checkpoint is False:
        raise LowbitError("--resume continues from saved blocks; drop --no-checkpoint")
    device = Engine(device=a.device).resolved_device()
    checkpoint = a.checkpoint if a.checkpoint is not None else device == "cpu"
    engine = Engine(device=device, offload_activations=a.offload_activations, hessians_on_cpu=a.hessians_on_cpu,
                    progress=not a.no_progress, threads=a.threads, save_search=a.awq_save,
                    checkpoint=checkpoint, resume=a.resume)
    gate = gate_from_args(a)
    res, report = gated(a.out, gate, lambda out: quantize(a.model, recipe, out, engine=engine, force=a.force),
                        lambda: load(a.model), force=a.force, progress=not a.no_progress)
    labels = ", ".join(dict.fromkeys(s.label for s in _schemes(res.recipe)))
    say(f"wrote {a.out}: {res.n_linears} linears ({labels}) in {res.seconds:.1f} s, "
        f"{res.bits_per_weight:.3f} bits/weight, {res.size_bytes / 1e6:.1f} MB; "
        f"kept in 16-bit: {', '.join(res.kept) or 'none'}")
    if report:
        say(describe(report))


def _budgeted_recipe(a: argparse.Namespace, budget: Any) -> Any:
    """The recipe of ``--bpw`` / ``--max-size``: the flags' recipe with the allocation's scheme and overrides."""
    from lowbit.cli.mixed_flags import allocate_args, report_allocation

    if a.scheme is not None or a.override or a.ignore:
        raise LowbitError("--bpw / --max-size choose each layer's scheme: drop --scheme, --override and --ignore "
                          "(or allocate with `lowbit sensitivity`, then edit the recipe the artifact holds)")
    label = a.method or "rtn"
    sens_method = {"rtn": "rtn", "imatrix-rtn": "imatrix", "gptq": "gptq"}.get(label)
    if sens_method is None:
        raise LowbitError(f"--bpw allocates for rtn, imatrix-rtn or gptq, not {label}")
    a.scheme = "W4A16"  # a placeholder: the allocation replaces it
    base = recipe_from_args(a)
    a.scheme = None
    scale_bytes = 4 if a.dtype == "float32" else 2
    alloc = allocate_args(a, "int", budget, method=sens_method, calib=a.calib, scale_bytes=scale_bytes)
    report_allocation(alloc)
    return alloc.recipe(base)


def _schemes(recipe: Any) -> list[Any]:
    return [recipe.scheme] + [o.scheme for o in recipe.overrides if o.scheme is not None]

