"""``lowbit doctor``: check an artifact against the engines that will run it, before deploy time.

Per engine a verdict (``ok`` / ``fails``) from findings, each naming the layer, the rule and the fix:

- ``vllm`` (rules only, :mod:`lowbit.doctor.rules`): compressed-tensors schemes per layer and per fused
  linear, kernel shape divisibility; bitsandbytes and AWQ folders are loaded by vLLM as they are.
- ``llamacpp`` / ``ollama`` (GGUF files): the header (:mod:`lowbit.models.gguf_header`), tensor types and
  name lengths, the metadata llama.cpp reads, the tokenizer (ids inside the vocabulary, the embedding rows);
  ``ollama`` adds a chat template it can translate; then a real load with llama-cpp-python when installed.
- ``transformers``: a real load with ``AutoModelForCausalLM.from_pretrained`` and finite logits on a few
  tokens.

For every artifact: NaN/Inf in any stored float tensor, and an fp16-overflow scan (the largest activation
of every module on a few calibration tokens, through ``lowbit.load``, against float16's 65504).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.core.errors import LowbitError
from lowbit.doctor.rules import LLAMACPP_KEYS, LLAMACPP_MAX_NAME, Finding, vllm_fused, vllm_layer

log = logging.getLogger(__name__)

ENGINES = ("vllm", "llamacpp", "transformers", "ollama")
FP16_MAX = 65504.0
PROBE = "The quick brown fox jumps over the lazy dog. Low-bit models keep their answers."


@dataclass
class Report:
    path: Path
    kind: str  # gguf or a format name
    engines: tuple[str, ...]
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, str] = field(default_factory=dict)  # engine -> how (rules, real load, not applicable)
    activations: list[tuple[str, float]] = field(default_factory=list)  # (module, max |x|), largest first

    def verdict(self, engine: str) -> bool:
        return not any(f.fatal and f.engine in (engine, "all") for f in self.findings)

    @property
    def ok(self) -> bool:
        return all(self.verdict(e) for e in self.engines)


def doctor(path: str | Path, engines: tuple[str, ...] = ENGINES, scan: bool = True) -> Report:
    """Check ``path`` (an artifact folder or a .gguf file) for ``engines``; ``scan`` runs the activation scan."""
    p = Path(path)
    if not p.exists():
        raise LowbitError(f"no such file or folder: {p}")
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise LowbitError(f"unknown engine {bad[0]!r}; use one of {', '.join(ENGINES)} or all")
    if (p.is_dir() and not (p / "config.json").exists()) or (p.is_file() and p.suffix != ".gguf"
                                                             and not _gguf_magic(p)):
        raise LowbitError(f"{p} is neither an artifact folder (it holds config.json) nor a .gguf file; pass the "
                          "folder `lowbit quantize` wrote or a .gguf file")  # a damaged one is a finding, not this
    if p.is_file():
        rep = Report(p, "gguf", engines)
        _gguf(rep)
        return rep
    from lowbit.formats.registry import detect, read_config_dict

    try:
        fmt = detect(p)
    except LowbitError as err:
        return Report(p, "unreadable", engines, [Finding("all", "config.json", str(err), "re-export the artifact")])
    rep = Report(p, fmt.name if fmt else "dense", engines)
    _finite(rep)
    if "vllm" in engines:
        _vllm(rep, read_config_dict(p) or {})
    for eng in ("llamacpp", "ollama"):
        if eng in engines:
            rep.findings.append(Finding(eng, str(p), f"{eng} runs GGUF files, not a {rep.kind} folder",
                                        f"convert it: lowbit gguf {p} -o model.gguf"))
            rep.checked[eng] = "not applicable"
    if "transformers" in engines:
        _transformers(rep)
    if scan and rep.verdict("all"):
        _activations(rep)
    return rep


def _gguf_magic(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


# -- every artifact -------------------------------------------------------------------------------------------------
def _tensor_headers(folder: Path) -> dict[str, tuple[str, list[int], Path]]:
    """name -> (dtype, shape, file) of every tensor in the folder's safetensors files (headers only)."""
    import json
    import struct

    from lowbit.models.loader import check_safetensors

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f)
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            head = json.loads(fh.read(n))
        out.update({k: (v["dtype"], v["shape"], f) for k, v in head.items() if k != "__metadata__"})
    return out


def _finite(rep: Report) -> None:
    from safetensors import safe_open

    try:
        heads = _tensor_headers(rep.path)
    except LowbitError as e:
        rep.findings.append(Finding("all", "weights", str(e), "re-export the artifact"))
        return
    for name, (dtype, _, f) in heads.items():
        if dtype not in ("F32", "F16", "BF16", "F64"):
            continue
        with safe_open(str(f), "pt") as st:
            t = st.get_tensor(name)
        bad = int((~t.isfinite()).sum())
        if bad:
            rep.findings.append(Finding("all", name, f"{bad} NaN/Inf values stored (every engine computes NaN)",
                                        "re-quantize from a clean checkpoint; check the calibration run's log"))


def _activations(rep: Report) -> None:
    """Largest |output| of every module on a few tokens (float32, so nothing saturates here)."""
    import torch

    from lowbit.jobs.artifacts import load

    try:
        model, tok = load(rep.path, "cpu")
    except Exception as e:  # noqa: BLE001 -- reported as a finding for every engine
        rep.findings.append(Finding("all", str(rep.path), f"lowbit cannot load it ({type(e).__name__}: {e})",
                                    "re-export the artifact"))
        return
    peaks: dict[str, float] = {}

    def hook(name: str) -> Any:
        def fn(m: Any, args: Any, out: Any) -> None:
            o = out[0] if isinstance(out, tuple) else out
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel():
                peaks[name] = max(peaks.get(name, 0.0), float(o.detach().abs().max()))
        return fn

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            ids = tok(PROBE, return_tensors="pt")["input_ids"][:, :64]
            logits = model(input_ids=ids).logits
    finally:
        for h in hs:
            h.remove()
    rep.activations = sorted(peaks.items(), key=lambda kv: -kv[1])
    if not torch.isfinite(logits).all():
        rep.findings.append(Finding("all", "logits", "NaN/Inf logits on a plain sentence", "re-quantize"))
    for name, peak in rep.activations:
        if peak > FP16_MAX and not name.endswith("lm_head"):
            rep.findings.append(Finding("all", name, f"activation {peak:.3g} overflows float16 (max 65504): served "
                                        "in fp16 it becomes Inf", "serve in bfloat16 (vLLM --dtype bfloat16)",
                                        fatal=False))


# -- vLLM -----------------------------------------------------------------------------------------------------------
def _matches(target: str, name: str) -> bool:
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def _vllm(rep: Report, config: dict[str, Any]) -> None:
    rep.checked["vllm"] = "rules (vLLM is not installed here)"
    qc = config.get("quantization_config") or {}
    if rep.kind in ("bitsandbytes", "awq"):
        if rep.kind == "awq" and (qc.get("bits") != 4 or qc.get("group_size") not in (32, 64, 128)):
            rep.findings.append(Finding("vllm", "quantization_config", f"AWQ with {qc.get('bits')} bits, group "
                                        f"{qc.get('group_size')}: vLLM's AWQ kernels take 4 bits, groups 32-128",
                                        "use W4A16_ASYM with group size 128"))
        return
    if rep.kind == "dense":
        return
    groups = qc.get("config_groups") or {}
    ignore = qc.get("ignore") or []
    try:
        heads = _tensor_headers(rep.path)
    except LowbitError as e:  # reported once, by the NaN/Inf scan, for every engine
        log.debug("vllm rules skipped: %s", e)
        return
    shapes = _linear_shapes(heads)
    chosen: dict[str, dict[str, Any] | None] = {}
    for name, shape in shapes.items():
        if any(_matches(t, name) for t in ignore):
            chosen[name] = None
            continue
        g = next((g for g in groups.values() if any(_matches(t, name) for t in g.get("targets", []))), None)
        chosen[name] = g
        if g is not None:
            rep.findings += vllm_layer(name, shape, g)
    rep.findings += vllm_fused(chosen)


def _linear_shapes(heads: dict[str, tuple[str, list[int], Path]]) -> dict[str, tuple[int, int] | None]:
    """Quantized or float linears of a compressed-tensors folder and their (out, in)."""
    out: dict[str, tuple[int, int] | None] = {}
    for k, (_, shape, f) in heads.items():
        mod, _, leaf = k.rpartition(".")
        if leaf == "weight_shape":
            from safetensors import safe_open

            with safe_open(str(f), "pt") as st:
                s = st.get_tensor(k).tolist()
            out[mod] = (int(s[0]), int(s[1]))
        elif leaf == "weight" and len(shape) == 2 and ("proj" in mod or mod.endswith("lm_head")):
            out.setdefault(mod, (shape[0], shape[1]))
    return out


# -- transformers ---------------------------------------------------------------------------------------------------
def _transformers(rep: Report) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rep.checked["transformers"] = "real load"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(rep.path), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(rep.path))
        with torch.no_grad():
            logits = model(**tok(PROBE, return_tensors="pt")).logits
    except Exception as e:  # noqa: BLE001 -- the engine's own refusal is the finding
        rep.findings.append(Finding("transformers", str(rep.path), f"does not load: {type(e).__name__}: "
                                    f"{str(e)[:300]}", "install the format's client (compressed-tensors, "
                                    "bitsandbytes, gptqmodel) or re-export"))
        return
    if not torch.isfinite(logits).all():
        rep.findings.append(Finding("transformers", "logits", "NaN/Inf logits", "re-quantize from a clean checkpoint"))


# -- llama.cpp / Ollama ---------------------------------------------------------------------------------------------
def _gguf(rep: Report) -> None:
    from lowbit.core.errors import ModelLoadError
    from lowbit.models.gguf_header import read_header

    for eng in ("vllm", "transformers"):
        if eng in rep.engines:
            rep.checked[eng] = "rules"
            rep.findings.append(Finding(eng, str(rep.path), f"{eng} serves folders; this is a GGUF file",
                                        "quantize to a folder with lowbit quantize (compressed-tensors)"))
    try:
        h = read_header(rep.path)
    except ModelLoadError as err:
        rep.findings.append(Finding("all", str(rep.path), str(err), "re-export the file (lowbit gguf)"))
        return
    f = h.fields
    arch = f.get("general.architecture")
    import gguf

    known = {str(v) for v in gguf.MODEL_ARCH_NAMES.values()}
    if arch not in known:
        rep.findings.append(Finding("llamacpp", "general.architecture", f"architecture {arch!r} is unknown to "
                                    "llama.cpp", "convert a supported architecture"))
    for key in LLAMACPP_KEYS:
        k = key.format(arch=arch)
        if k not in f:
            rep.findings.append(Finding("llamacpp", k, "missing: llama.cpp reads it for every model",
                                        "re-export with lowbit gguf"))
    got = f.get("tokenizer.ggml.tokens")
    tokens: list[Any] = got if isinstance(got, list) else []
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        v = f.get(key)
        if v is not None and not (isinstance(v, int) and 0 <= v < len(tokens)):
            rep.findings.append(Finding("llamacpp", key, f"token id {v} outside the {len(tokens)}-token vocabulary",
                                        "re-export the tokenizer"))
    for t in h.tensors:
        if len(t.name) > LLAMACPP_MAX_NAME:
            rep.findings.append(Finding("llamacpp", t.name, f"name of {len(t.name)} characters (llama.cpp: 63)",
                                        "shorten the tensor name"))
        if t.name == "token_embd.weight" and tokens and t.shape[-1] != len(tokens):
            rep.findings.append(Finding("llamacpp", t.name, f"{t.shape[-1]} embedding rows for {len(tokens)} tokens",
                                        "re-export with the model's own tokenizer"))
    if "ollama" in rep.engines:
        from lowbit.serve.ollama import export_ollama  # noqa: F401 -- Ollama's templates are lowbit's families

        if not isinstance(f.get("tokenizer.chat_template"), str):
            rep.findings.append(Finding("ollama", "tokenizer.chat_template", "no chat template: Ollama would "
                                        "send raw prompts", "export the Modelfile with a TEMPLATE", fatal=False))
    for eng in ("llamacpp", "ollama"):
        if eng in rep.engines:
            rep.checked[eng] = "rules"
    if rep.verdict("llamacpp") and any(e in rep.engines for e in ("llamacpp", "ollama")):
        _llamacpp_load(rep)


def _llamacpp_load(rep: Report) -> None:
    try:
        import llama_cpp
    except ImportError:
        return
    rep.checked["llamacpp"] = "rules + real load (llama-cpp-python)"
    try:
        m = llama_cpp.Llama(str(rep.path), n_ctx=64, n_threads=1, verbose=False)
        m.close()
    except Exception as e:  # noqa: BLE001 -- llama.cpp's own refusal is the finding
        rep.findings.append(Finding("llamacpp", str(rep.path), f"llama.cpp refuses it ({e})", "re-export the file"))


def layer_errors(path: str | Path, reference: str) -> list[tuple[str, float]]:
    """``(linear, ||W - W_hat|| / ||W||)`` for every quantized linear, against the reference model's weights."""
    import torch

    from lowbit.jobs.artifacts import load
    from lowbit.models.loader import load_model

    model, _ = load(path, "cpu")
    ref = dict(load_model(reference, device="cpu", dtype=torch.float32).model.named_modules())
    rows = []
    for name, m in model.named_modules():
        deq = getattr(m, "dequantized_weight", None)
        if deq is None or name not in ref:
            continue
        w, wq = ref[name].weight.float(), deq(torch.float32)
        rows.append((name, float((w - wq).norm() / w.norm().clamp_min(1e-12))))
    return rows
