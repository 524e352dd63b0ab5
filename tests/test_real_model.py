"""End to end on a real model (SmolLM2-135M, fetched once from PyPI): marked slow."""

import json

import pytest
import torch

from lowbit.cli import main

pytestmark = pytest.mark.slow


def test_lowbit_run_writes_a_report(tmp_path):
    """``lowbit run`` (= compare on SmolLM2 with the default menu), shrunk: one short window, a small calibration."""
    out = tmp_path / "run"
    rc = main(["--no-progress", "run", "-o", str(out), "--windows", "1", "--ctx", "512", "--calib-samples", "4",
               "--calib-len", "256", "--new-tokens", "8", "--reps", "1"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# lowbit compare: smollm2-135m")
    rows = {r["name"]: r for r in rep["rows"]}
    from lowbit.compare import DEFAULT_MENU

    assert set(rows) == set(DEFAULT_MENU)
    assert rep["eval"]["protocol"] == "gptq" and rep["eval"]["tokens"] == 511
    ref = rows["reference"]["ppl"]
    assert 1 < ref < 100
    assert abs(rows["W8A16"]["ppl"] / ref - 1) < 0.05 and rows["W8A16"]["kld"] < 0.02
    assert rows["gguf:Q8_0"]["kld"] < 0.02 and rows["gguf:Q8_0"]["engine"].startswith("llama.cpp")
    for name in ("W4A16:gptq", "W4A16:awq", "W4A16:imatrix-rtn", "NF4", "gguf:Q4_K_M"):
        assert rows[name]["kld"] > rows["W8A16"]["kld"], name  # 4 bits lose more than 8
        assert rows[name]["size_bytes"] < rows["W8A16"]["size_bytes"] < rows["reference"]["size_bytes"], name
        assert rows[name]["decode_tokens_per_s"] > 0 and rows[name]["peak_memory_bytes"] > 0
    assert rows["W4A16:gptq"]["recipe"]["scheme"]["group_size"] == 64  # 576 is not a multiple of 128
    assert rep["recommendation"]["name"] in rows and (out / "report.html").is_file()


def test_transformers_loads_real_artifact_and_agrees(tmp_path):
    """The brief's one-liner on a real model, and its logits against our own loader's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.formats.compressed_tensors import load_quantized

    out = tmp_path / "smol-w4"
    assert main(["--no-progress", "quantize", "smollm2-135m", "--scheme", "W4A16", "--group-size", "64",
                 "-o", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours, _ = load_quantized(out)
    with torch.inference_mode():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    assert int(a[0, -1].argmax()) == int(b[0, -1].argmax())
