"""``lowbit doctor`` on a matrix of artifacts (every scheme and format lowbit writes, plus broken ones),
its verdict compared with a real load by the engine installed here: transformers (+ compressed-tensors,
bitsandbytes, gptqmodel) for folders, llama-cpp-python for GGUF files. A "false OK" is a doctor ok for an
artifact the engine then refuses (or gives NaN logits for).

    python bench/doctor_matrix.py --json bench/results/doctor/matrix.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FOLDERS = [  # (name, scheme, group size or None, extra recipe fields, method)
    ("W8A16", "W8A16", None, {}), ("W4A16-g32", "W4A16", 32, {}), ("W4A16-g64", "W4A16", 64, {}),
    ("W4A16-g128", "W4A16", 128, {}), ("W4A16_ASYM-g128", "W4A16_ASYM", 128, {}), ("W3A16-g128", "W3A16", 128, {}),
    ("W3A16_ASYM-g64", "W3A16_ASYM", 64, {}), ("W2A16-g128", "W2A16", 128, {}),
    ("W2A16_ASYM-g32", "W2A16_ASYM", 32, {}),
    ("W4A16-channel", "W4A16", -1, {}), ("W8A8", "W8A8", None, {}), ("FP8", "FP8", None, {}),
    ("FP8-block128", "FP8", 128, {}), ("FP8_DYNAMIC", "FP8_DYNAMIC", None, {}), ("NF4", "NF4", None, {}),
    ("NF4-dq", "NF4", None, {"double_quant": True}), ("FP4", "FP4", None, {}),
    ("AWQ-format", "W4A16_ASYM", 128, {"format": "awq"}), ("mixed-down-W8", "W4A16", 128, {"override": "W8A16"}),
]
GGUF = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "Q4_K_M", "Q6_K"]


def make_folder(base: Path, out: Path, scheme: str, gs: int | None, extra: dict[str, Any]) -> Path:
    import lowbit
    from lowbit.core.dtypes import DataTypeScheme
    from lowbit.recipe.schema import Export, Override, Recipe

    s = lowbit.lookup_scheme(scheme)
    if extra.get("double_quant"):
        s = dataclasses.replace(s, double_quant=True)
    if gs is not None:
        s = dataclasses.replace(s, group_size=None if gs == -1 and not isinstance(s, DataTypeScheme) else gs)
    kw: dict[str, Any] = {}
    if "format" in extra:
        kw["export"] = Export(format=extra["format"])
    if "override" in extra:
        kw["overrides"] = (Override(targets=("re:.*down_proj",), scheme=lowbit.lookup_scheme(extra["override"])),)
    return lowbit.quantize(str(base), Recipe(scheme=s, **kw), out).path


def broken(good: Path, ggood: Path, tmp: Path) -> list[tuple[str, Path]]:
    from safetensors.torch import load_file, save_file

    out = []
    nan = tmp / "broken-nan-scale"
    shutil.copytree(good, nan)
    t = load_file(str(nan / "model.safetensors"))
    k = next(x for x in t if x.endswith("weight_scale"))
    t[k][0, 0] = float("nan")
    save_file(t, str(nan / "model.safetensors"), metadata={"format": "pt"})
    out.append(("broken-nan-scale", nan))
    cut = tmp / "broken-truncated-weights"
    shutil.copytree(good, cut)
    b = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(b[: len(b) // 2])
    out.append(("broken-truncated-weights", cut))
    bits = tmp / "broken-config-bits"
    shutil.copytree(good, bits)
    cfg = json.loads((bits / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (bits / "config.json").write_text(json.dumps(cfg))
    out.append(("broken-config-bits", bits))
    fused = tmp / "broken-fused-q-W8"
    shutil.copytree(good, fused)
    cfg = json.loads((fused / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    w8 = copy.deepcopy(groups["group_0"])
    w8["targets"], w8["weights"]["num_bits"], w8["weights"]["strategy"] = ["re:.*q_proj"], 8, "channel"
    cfg["quantization_config"]["config_groups"] = {"group_1": w8, **groups}
    (fused / "config.json").write_text(json.dumps(cfg))
    out.append(("broken-fused-q-W8", fused))
    noq = tmp / "broken-no-tokenizer"
    shutil.copytree(good, noq)
    for f in noq.glob("tokenizer*"):
        f.unlink()
    out.append(("broken-no-tokenizer", noq))
    g = ggood.read_bytes()
    for name, data in (("broken-gguf-truncated", g[: len(g) - 64]), ("broken-gguf-magic", b"GGUX" + g[4:]),
                       ("broken-gguf-version", g[:4] + (9).to_bytes(4, "little") + g[8:])):
        p = tmp / f"{name}.gguf"
        p.write_bytes(data)
        out.append((name, p))
    return out


def real_load(path: Path) -> tuple[bool, str]:
    import torch

    if path.is_file():
        import llama_cpp

        try:
            llama_cpp.Llama(str(path), n_ctx=32, n_threads=1, verbose=False).close()
            return True, "llama-cpp-python loads it"
        except Exception as e:  # noqa: BLE001
            return False, f"llama-cpp-python: {str(e)[:120]}"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        ids = AutoTokenizer.from_pretrained(str(path))("hello world", return_tensors="pt")
        finite = bool(torch.isfinite(m(**ids).logits).all())
        return finite, "transformers loads it" + ("" if finite else " but the logits are NaN/Inf")
    except Exception as e:  # noqa: BLE001
        return False, f"transformers: {type(e).__name__}: {str(e)[:120]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from conftest import make_tiny_model_dir
    from lowbit.cli import main as cli
    from lowbit.doctor import doctor

    tmp = Path(tempfile.mkdtemp(prefix="lowbit-doctor-"))
    base = make_tiny_model_dir(tmp / "base", "llama", seed=1, hidden_size=128, intermediate_size=256)
    arts: list[tuple[str, Path]] = []
    for name, scheme, gs, extra in FOLDERS:
        try:
            arts.append((name, make_folder(base, tmp / name, scheme, gs, extra)))
        except Exception as e:  # noqa: BLE001 -- a scheme this lowbit cannot write is reported, not fatal
            print(f"{name}: not written ({e})", flush=True)
    for t in GGUF:
        p = tmp / f"gguf-{t}.gguf"
        if cli(["gguf", str(base), "-o", str(p), "--type", t]) == 0:
            arts.append((f"gguf-{t}", p))
    arts += broken(tmp / "W4A16-g128", tmp / "gguf-Q8_0.gguf", tmp)
    rows = []
    for name, p in arts:
        engine = "llamacpp" if p.is_file() else "transformers"
        rep = doctor(p, (engine, "vllm") if not p.is_file() else (engine,), scan=False)
        loads, why = real_load(p)
        row = {"artifact": name, "engine": engine, "doctor": rep.verdict(engine), "real_load": loads,
               "vllm_rules": rep.verdict("vllm") if not p.is_file() else None,
               "match": rep.verdict(engine) == loads, "false_ok": rep.verdict(engine) and not loads,
               "why": why, "findings": [f"{f.engine} {f.where}: {f.rule}" for f in rep.findings][:3]}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("artifact", "engine", "doctor", "real_load", "vllm_rules", "match")}),
              flush=True)
    n, m, fo = len(rows), sum(r["match"] for r in rows), sum(r["false_ok"] for r in rows)
    print(f"{n} artifacts: doctor matches the real load on {m}, false OK {fo}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"artifacts": n, "match": m, "false_ok": fo, "rows": rows}, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
