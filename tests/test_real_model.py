"""End to end on a real model (SmolLM2-135M, fetched once from PyPI): marked slow."""

import json

import pytest
import torch

from lowbit.cli import main

pytestmark = pytest.mark.slow


def test_lowbit_run_writes_a_report(tmp_path):
    out = tmp_path / "run"
    rc = main(["--no-progress", "run", "-o", str(out), "--windows", "1", "--ctx", "512", "--calib-samples", "4",
               "--calib-len", "256"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# lowbit report: smollm2-135m")
    rows = {r["name"]: r for r in rep["rows"]}
    assert set(rows) == {"reference", "W8A16-rtn", "W4A16-rtn", "W4A16-imatrix-rtn"}
    assert rep["eval"]["protocol"] == "gptq" and rep["eval"]["tokens_scored"] == 511
    ref = rows["reference"]["ppl"]
    assert 1 < ref < 100
    assert abs(rows["W8A16-rtn"]["ppl"] / ref - 1) < 0.05 and rows["W8A16-rtn"]["kld"] < 0.02
    assert rows["W4A16-rtn"]["kld"] > rows["W8A16-rtn"]["kld"]
    assert 4.2 < rows["W4A16-rtn"]["bits_per_weight"] < 4.3  # group 64 (576 is not a multiple of 128)
    assert rows["W4A16-rtn"]["size_bytes"] < 0.5 * rows["reference"]["size_bytes"]


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
