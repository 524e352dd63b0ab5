"""The command line end to end on a tiny model, and every bad input of the foundation issue."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import eval_windows, kld_top1, make_tiny_model_dir
from lowbit.cli import main
from lowbit.pipeline.registry import entry_for
from lowbit.recipe import Recipe

TEXT = "\n\n".join(f"line {i}: the quick brown fox jumps over the lazy dog and low bit models" for i in range(80))


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_model_dir(tmp_path / "tiny", "llama")


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def _no_partial(folder):
    return not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.mark.parametrize("method", ["rtn", "imatrix-rtn"])
def test_quantize_then_eval(tmp_path, tiny, corpus, method, capsys):
    out = tmp_path / "q"
    rc = main(["--no-progress", "quantize", str(tiny), "--scheme", "W4A16", "--group-size", "32", "--method",
               method, "--calib", str(corpus), "--calib-samples", "4", "--calib-len", "16", "-o", str(out)])
    assert rc == 0
    assert "14 linears" in capsys.readouterr().out
    recipe = Recipe.from_file(out / "recipe.yaml")
    assert entry_for(recipe.method).name == method and recipe.scheme.group_size == 32
    res = tmp_path / "eval.json"
    rc = main(["--no-progress", "eval", str(out), "--reference", str(tiny), "--data", str(corpus), "--ctx", "32",
               "--max-windows", "3", "--json", str(res)])
    assert rc == 0
    r = json.loads(res.read_text())["results"]
    assert r["q"]["protocol"] == "gptq" and r["reference"]["kld_mean"] is None and r["q"]["n_tokens"] == 3 * 31
    # The brief's one-liner, checked: transformers loads our artifact and computes our loader's logits
    # (its compressed module forms s (q - z) in float32, as ours does: the same products up to summation
    # order, 1e-5, see tests/test_artifacts.py; one code off by one step moves a logit by ~1e-3). Then
    # the eval's numbers, recomputed from the two transformers models on the gptq protocol's windows.
    from lowbit.formats.compressed_tensors import load_quantized

    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    windows = eval_windows(out, corpus.read_text(), 32, 3)
    with torch.inference_mode():
        assert torch.allclose(theirs(windows).logits, load_quantized(out)[0](windows).logits, rtol=0, atol=1e-5)
    kld, top1 = kld_top1(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), theirs, windows)
    # each log-probability is a float32 log-softmax of O(1) logits on both sides, ~1e-6 absolute apart
    # between the two computations; KLD = E_p[lp - lq] (here ~1.3e-4) moves by at most that
    assert abs(r["q"]["kld_mean"] - kld) <= 2e-6, (r["q"]["kld_mean"], kld)
    assert abs(r["q"]["top1"] - top1) <= 1 / 93 + 1e-9  # at most one near-tied argmax flips


@pytest.mark.parametrize("extra, alpha, scope", [([], 0.5, "skip-last"), (["--asym-scope", "all"], 0.5, "all"),
                                                 (["--asym-alpha", "0"], 0.0, "skip-last")])
def test_gptq_asymmetric_calibration_options_reach_the_recipe(tmp_path, tiny, corpus, extra, alpha, scope):
    out = tmp_path / "q"
    assert main(["--no-progress", "quantize", str(tiny), "--scheme", "W4A16", "--group-size", "32", "--method", "gptq",
                 "--calib", str(corpus), "--calib-samples", "4", "--calib-len", "16", *extra, "-o", str(out)]) == 0
    gptq = Recipe.from_file(out / "recipe.yaml").method
    assert (gptq.asym_alpha, gptq.asym_scope) == (alpha, scope)


@pytest.mark.parametrize("args, message", [
    (["--scheme", "W5A5"], "unknown scheme"),
    (["--scheme", "W4A16", "--group-size", "48"], "does not divide"),
    (["--scheme", "W4A16", "--group-size", "32", "--method", "imatrix-rtn", "--calib", "EMPTY"],
     "holds no documents"),
    (["--scheme", "W4A16", "--group-size", "32", "--method", "gptq", "--mse-guard", "8"], "turn it on"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, tiny, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    out = tmp_path / "q"
    assert main(["--no-progress", "quantize", str(tiny), *args, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists() and _no_partial(out)


def test_missing_and_corrupt_models_exit_2(tmp_path, tiny, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "nope"), "--scheme", "W8A16", "-o", str(out)]) == 2
    st = tiny / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    assert main(["quantize", str(tiny), "--scheme", "W8A16", "-o", str(out)]) == 2
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    assert main(["quantize", str(bad), "--scheme", "W8A16", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "model.safetensors" in err and "bad.gguf" in err
    assert not out.exists() and _no_partial(out)


def test_nan_weights_exit_2(tmp_path, capsys):
    d = make_tiny_model_dir(tmp_path / "nan", "qwen2")
    m = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        m.model.layers[0].self_attn.v_proj.weight[1, 2] = float("nan")
    m.save_pretrained(d)
    out = tmp_path / "q"
    assert main(["quantize", str(d), "--scheme", "W4A16", "--group-size", "32", "-o", str(out)]) == 2
    assert "model.layers.0.self_attn.v_proj.weight has 1 NaN/Inf" in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists() and _no_partial(out)


def test_eval_unknown_corpus_exit_2(tmp_path, tiny, capsys):
    assert main(["eval", str(tiny), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "evaluation corpus" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["quantize"], ["eval"], ["run"], ["models"]])
def test_every_help_page_renders(command, capsys):
    """argparse formats help strings with %: a bare % in one breaks the whole page."""
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_gptq_warm_up_starts_after_the_rate_before_the_text_is_read(tmp_path, tiny, corpus, monkeypatch):
    """The GPU warm-up (GPTQMethod.prepare) is asked for before tokenization, so its kernel compile
    overlaps reading the calibration text; the engine's later call is then a no-op. The estimate's
    matmul rate is timed before it, and the estimate uses that rate."""
    from lowbit.jobs import quantization as jobs
    from lowbit.pipeline.gptq import GPTQMethod

    events: list[str] = []
    real_prepare, real_tokens = GPTQMethod.prepare, jobs.calibration_tokens

    def prepare(self, device):  # type: ignore[no-untyped-def]
        events.append(f"prepare:{device.type}")
        return real_prepare(self, device)

    def tokens(*a, **k):  # type: ignore[no-untyped-def]
        events.append("tokens")
        return real_tokens(*a, **k)

    def rate(device, dtype):  # type: ignore[no-untyped-def]
        events.append("rate")
        return 1e9  # FLOP/s: the estimate must use this one (no second timing loop)

    real_estimate = jobs.estimate_run

    def estimate(*a, **k):  # type: ignore[no-untyped-def]
        events.append(f"estimate:{k.get('rate')}")
        return real_estimate(*a, **k)

    monkeypatch.setattr(GPTQMethod, "prepare", prepare)
    monkeypatch.setattr(jobs, "calibration_tokens", tokens)
    monkeypatch.setattr(jobs, "compute_rate", rate)
    monkeypatch.setattr(jobs, "estimate_run", estimate)
    assert main(["--no-progress", "quantize", str(tiny), "--scheme", "W4A16", "--group-size", "32", "--method", "gptq",
                 "--calib", str(corpus), "--calib-samples", "4", "--calib-len", "16", "-o", str(tmp_path / "q")]) == 0
    # the estimate's matmul rate is timed before the warm-up starts (which would share the device with it)
    assert events[:4] == ["rate", "prepare:cpu", "tokens", "estimate:1000000000.0"]
    assert events.count("prepare:cpu") == 2
