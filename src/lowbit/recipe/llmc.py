"""llm-compressor recipes, translated into lowbit's recipe form.

A user brings an llm-compressor recipe YAML unchanged::

    quant_stage:
      quant_modifiers:
        GPTQModifier:
          ignore: [lm_head]
          dampening_frac: 0.01
          config_groups:
            group_0: {targets: [Linear], weights: {num_bits: 4, type: int, symmetric: true,
                                                   strategy: group, group_size: 128, actorder: static}}
            group_1: {targets: ["re:.*down_proj"], weights: {num_bits: 8, type: int, symmetric: true,
                                                             strategy: channel}}

The modifiers lowbit has are read (``QuantizationModifier`` -> RTN, ``GPTQModifier`` -> GPTQ,
``AWQModifier`` -> AWQ (then RTN, or GPTQ when a GPTQModifier follows), ``SmoothQuantModifier`` ->
SmoothQuant before the W8A8 quantizer); fields lowbit cannot honour are errors naming them. Fields a
recipe leaves out take lowbit's defaults (so lowbit's GPTQ keeps its asymmetric calibration; set
``method.asym_alpha: 0`` in a lowbit recipe for plain GPTQ). The config group that targets
``Linear`` becomes the recipe's scheme and the others overrides, in order; without one, every linear
is kept 16-bit first and each group's targets get its scheme.
"""

from __future__ import annotations

import logging
from typing import Any

from lowbit.core.errors import RecipeError

log = logging.getLogger(__name__)

MODIFIERS = ("QuantizationModifier", "GPTQModifier", "AWQModifier", "SmoothQuantModifier")
# fields that change how llm-compressor runs, not what it produces: accepted and left to lowbit's engine
_ENGINE_FIELDS = {"offload_hessians", "offload_device", "max_chunk_memory", "sequential_targets",
                  "num_calibration_steps", "quantize"}
_QUANT_FIELDS = {"targets", "ignore", "scheme", "config_groups", "kv_cache_scheme"}
_FIELDS = {
    "QuantizationModifier": _QUANT_FIELDS,
    "GPTQModifier": _QUANT_FIELDS | {"dampening_frac", "block_size", "actorder", "sequential_update"},
    "AWQModifier": _QUANT_FIELDS | {"mappings", "duo_scaling", "n_grid"},
    "SmoothQuantModifier": {"smoothing_strength", "mappings", "ignore"},
}
_WEIGHT_ARGS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
                "actorder", "observer", "observer_kwargs", "zp_dtype", "scale_dtype"}


def _modifiers(data: Any, path: str = "") -> list[tuple[str, str, Any]]:
    """``(name, path, args)`` of every ``*Modifier`` key, in document order, at any depth."""
    out: list[tuple[str, str, Any]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and k.endswith("Modifier"):
                out.append((k, p, v if v is not None else {}))
            else:
                out.extend(_modifiers(v, p))
    return out


def is_llmcompressor(data: Any) -> bool:
    """Whether ``data`` is an llm-compressor recipe (it has ``*Modifier`` keys and no lowbit ``scheme``)."""
    return isinstance(data, dict) and "scheme" not in data and bool(_modifiers(data))


def _err(path: str, msg: str) -> RecipeError:
    return RecipeError(f"{path}: {msg}")


def _actorder(v: Any, path: str) -> dict[str, Any]:
    if v in (None, False):
        return {"act_order": False}
    if v in ("static", "weight", True):
        return {"act_order": True, "static_groups": True}
    if v == "group":
        return {"act_order": True, "static_groups": False}
    raise _err(path, f"actorder {v!r} is not one lowbit knows (static, weight, group, null)")


def _weights(w: Any, acts: Any, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(lowbit scheme mapping, method options) of one group's ``weights`` / ``input_activations``."""
    if not isinstance(w, dict):
        raise _err(path, f"weights must be a mapping, got {w!r}")
    for k in w:
        if k not in _WEIGHT_ARGS:
            raise _err(f"{path}.{k}", f"lowbit cannot honour this weights field (it reads {sorted(_WEIGHT_ARGS)})")
    if w.get("observer_kwargs"):
        raise _err(f"{path}.observer_kwargs", "observer arguments are not honoured; remove them")
    if w.get("dynamic"):
        raise _err(f"{path}.dynamic", "dynamic weight quantization is not honoured")
    opts: dict[str, Any] = {}
    if w.get("observer") == "mse":
        opts["search"] = True
    elif w.get("observer") not in (None, "minmax", "memoryless", "memoryless_minmax", "static_minmax"):
        raise _err(f"{path}.observer", f"observer {w['observer']!r} is not honoured (minmax or mse)")
    if "actorder" in w:
        opts.update(_actorder(w["actorder"], f"{path}.actorder"))
    strategy, bits, kind = w.get("strategy"), w.get("num_bits"), w.get("type", "int")
    act = _activations(acts, f"{path[:path.rfind('.')]}.input_activations")
    if kind == "float":
        if bits != 8:
            raise _err(f"{path}.num_bits", f"float weights are 8-bit (FP8) in lowbit, got {bits}")
        block = (w.get("block_structure") or [None])[0] if strategy == "block" else None
        if strategy not in ("channel", "block"):
            raise _err(f"{path}.strategy", f"FP8 weights are per channel or in blocks in lowbit, got {strategy!r}")
        return {"dtype": "fp8_e4m3", "block_size": block, "activations": "fp8-token" if act else None}, opts
    if kind != "int":
        raise _err(f"{path}.type", f"weight type {kind!r} is not honoured (int or float)")
    if strategy not in ("group", "channel"):
        raise _err(f"{path}.strategy", f"integer weights are per group or per channel in lowbit, got {strategy!r}")
    scheme: dict[str, Any] = {"bits": bits, "group_size": w.get("group_size") if strategy == "group" else None,
                              "symmetric": bool(w.get("symmetric", True))}
    if act:
        scheme.update(act_bits=8, act_strategy=act)
    return scheme, opts


def _activations(a: Any, path: str) -> str | None:
    """``token`` / ``tensor`` for int8 activations (``fp8-token`` for float), None for 16-bit."""
    if a is None:
        return None
    if not isinstance(a, dict) or a.get("num_bits") != 8:
        raise _err(path, f"only 8-bit activations are honoured, got {a!r}")
    if a.get("type", "int") == "float":
        return "token"
    if a.get("strategy") == "token" and a.get("dynamic", True):
        return "token"
    if a.get("strategy") == "tensor" and not a.get("dynamic", False):
        return "tensor"
    raise _err(path, "int8 activations are dynamic per token or static per tensor in lowbit")


def _groups(args: dict[str, Any], path: str) -> list[tuple[Any, tuple[str, ...], dict[str, Any]]]:
    """``(scheme, targets, method options)`` of a modifier's ``scheme`` / ``config_groups``."""
    targets = args.get("targets", ["Linear"])
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if args.get("kv_cache_scheme") is not None:
        raise _err(f"{path}.kv_cache_scheme", "KV-cache quantization is not honoured")
    if "config_groups" in args:
        out = []
        for g, body in (args["config_groups"] or {}).items():
            gp = f"{path}.config_groups.{g}"
            if not isinstance(body, dict) or "weights" not in body:
                raise _err(gp, "a config group needs weights")
            extra = set(body) - {"targets", "weights", "input_activations", "output_activations", "format"}
            if extra:
                raise _err(f"{gp}.{sorted(extra)[0]}", "lowbit cannot honour this config group field")
            if body.get("output_activations") is not None:
                raise _err(f"{gp}.output_activations", "output activation quantization is not honoured")
            s, opts = _weights(body["weights"], body.get("input_activations"), f"{gp}.weights")
            t = body.get("targets", ["Linear"])
            out.append((s, (t,) if isinstance(t, str) else tuple(t), opts))
        return out
    preset = args.get("scheme")
    if isinstance(preset, str):
        return [(preset, targets, {})]
    if isinstance(preset, dict):  # {preset: [targets]}
        return [(name, (t,) if isinstance(t, str) else tuple(t), {}) for name, t in preset.items()]
    return []


def llmcompressor_to_dict(data: Any) -> dict[str, Any]:
    """The lowbit recipe mapping of an llm-compressor recipe (see the module docstring)."""
    mods = _modifiers(data)
    names = [m[0] for m in mods]
    for name, path, args in mods:
        if name not in MODIFIERS:
            raise _err(path, f"lowbit cannot honour {name}; it reads {', '.join(MODIFIERS)}")
        if not isinstance(args, dict):
            raise _err(path, f"expected the modifier's arguments as a mapping, got {args!r}")
        for k in args:
            if k not in _FIELDS[name] | _ENGINE_FIELDS:
                raise _err(f"{path}.{k}", f"lowbit cannot honour this {name} field")
            if k in _ENGINE_FIELDS:
                log.info("%s.%s is an engine setting in lowbit (see lowbit quantize --help); ignored", path, k)
        if args.get("mappings"):
            raise _err(f"{path}.mappings", "lowbit takes the smoothing/AWQ mappings from its architecture table; "
                                           "remove mappings")
    if len(names) != len(set(names)):
        raise RecipeError(f"a modifier appears twice ({names}); lowbit reads one of each")
    by = {n: (p, a) for n, p, a in mods}
    # the modifier whose scheme quantizes (AWQ's own scheme only when no quantizer follows it)
    quant: list[str] = [n for n in ("GPTQModifier", "QuantizationModifier") if n in by and _groups(by[n][1], by[n][0])]
    if not quant and "AWQModifier" in by and _groups(by["AWQModifier"][1], by["AWQModifier"][0]):
        quant = ["AWQModifier"]
    if len(quant) != 1:
        raise RecipeError(f"expected one quantizing modifier with a scheme or config_groups, found {quant or 'none'}")
    qname = quant[0]
    qpath, qargs = by[qname]
    groups = _groups(qargs, qpath)
    inner: dict[str, Any] = {"name": "gptq" if qname == "GPTQModifier" else "rtn"}
    for _, _, opts in groups:
        inner.update(opts)
    if qname == "GPTQModifier":
        _gptq_options(qargs, qpath, inner)
    method = inner
    if "AWQModifier" in by:
        p, a = by["AWQModifier"]
        method = {"name": "awq", "inner": inner}
        if "duo_scaling" in a:
            method["duo_scaling"] = a["duo_scaling"]
        if "n_grid" in a:
            method["grid"] = a["n_grid"]
    if "SmoothQuantModifier" in by:
        p, a = by["SmoothQuantModifier"]
        method = {"name": "smoothquant", "alpha": a.get("smoothing_strength", 0.5)}
        if inner["name"] == "gptq":
            method["inner"] = inner
    ignore = [t for n in by for t in _as_list(by[n][1].get("ignore"))]
    overrides = _overrides(groups)  # puts the group targeting Linear first
    return {"scheme": groups[0][0], "method": method, "ignore": list(dict.fromkeys(ignore)),
            "overrides": overrides}


def _gptq_options(args: dict[str, Any], path: str, out: dict[str, Any]) -> None:
    if "dampening_frac" in args:
        out["damp"] = args["dampening_frac"]
    if "block_size" in args:
        out["block_size"] = args["block_size"]
    if "actorder" in args:
        out.update(_actorder(args["actorder"], f"{path}.actorder"))
    if args.get("sequential_update") is False:
        out["true_sequential"] = False


def _as_list(v: Any) -> list[str]:
    return [] if v is None else [v] if isinstance(v, str) else list(v)


def _overrides(groups: list[tuple[Any, tuple[str, ...], dict[str, Any]]]) -> list[dict[str, Any]]:
    """The base group targets ``Linear``; other groups become overrides (all of them, after keeping every
    linear 16-bit, when no group targets ``Linear``)."""
    base = [i for i, (_, t, _) in enumerate(groups) if "Linear" in t]
    if len(base) > 1:
        raise RecipeError("two config groups target Linear; lowbit needs one default group")
    if base and base[0] != 0:
        groups.insert(0, groups.pop(base[0]))
    rest = groups[1:] if base else groups
    ovs = [] if base else [{"targets": ["Linear"], "keep": True}]
    return ovs + [{"targets": list(t), "scheme": s} for s, t, _ in rest]
