"""The first hour of a new user: every bad input is one line, exit 2, before any model loads, nothing
written; data from any source; help that teaches; output a serving container can read."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from conftest import make_tiny_model_dir
from lowbit.cli import main


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything loads a model: the checks must come first."""
    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("a model was loaded before the inputs were checked")

    import lowbit.compare.run as cr
    import lowbit.jobs.artifacts as art
    import lowbit.jobs.quantization as jq
    import lowbit.models.loader as loader
    import lowbit.qat.job as qj

    for mod in (loader, jq, art, qj, cr):  # imported first: a module imported while patched keeps the patch
        monkeypatch.setattr(mod, "load_model", boom)
    monkeypatch.setattr(loader, "ensure_source", boom)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("t") / "m", "llama")


def _fails(args: list[str], capsys: pytest.CaptureFixture, needle: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) >= 1 and needle in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(("extra", "needle"), [
    (["--scheme", "W5A16"], "known schemes: W8A16"),
    (["--scheme", "W4A16", "--calib-samples", "0"], "--calib-samples must be >= 1"),
    (["--scheme", "W4A16", "--method", "gptq", "--calib", "no/such/file.jsonl"], "neither a known name"),
    (["--scheme", "W8A8", "--method", "smoothquant", "--alpha", "1.5"], "--alpha must lie in [0, 1]"),
    (["--scheme", "W4A16", "--alpha", "0.5"], "--alpha goes with --method smoothquant"),
    (["--scheme", "W4A16", "--damp", "0.1"], "--damp goes with --method gptq"),
    (["--scheme", "NF4", "--method", "gptq"], "does not apply"),
    (["--scheme", "W4A16", "--method", "smoothquant"], "W8A8"),
    (["--scheme", "W4A16", "--format", "bitsandbytes"], "not bitsandbytes"),
    (["--scheme", "W4A16", "--device", "cuda"], "no CUDA GPU"),
    (["--scheme", "W4A16", "--group-size", "48"], "does not divide"),
    (["--recipe", "missing.yaml"], "recipe file missing.yaml not found"),
])
def test_quantize_refuses_bad_input_before_loading(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture,
                                                    no_model_load: None, extra: list[str], needle: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    _fails(["quantize", str(tiny), *extra, "-o", str(out)], capsys, needle)
    assert not out.exists()


def test_output_checks_come_first(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture,
                                  no_model_load: None) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    _fails(["quantize", str(tiny), "--scheme", "W4A16", "-o", str(full)], capsys, "is not empty")
    _fails(["quantize", str(tiny), "--scheme", "W4A16", "-o", str(full), "--force"], capsys, "not a lowbit artifact")
    assert (full / "mine.txt").read_text() == "keep"
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    _fails(["quantize", str(tiny), "--scheme", "W4A16", "-o", str(afile / "sub")], capsys, "is a file")
    _fails(["quantize", "no/such/model", "--scheme", "W4A16", "-o", str(tmp_path / "o")], capsys, "no such file")
    # an offline source that is not fetched yet is not fetched to learn that -o is unusable
    _fails(["quantize", "qwen2.5-coder-0.5b", "--scheme", "W4A16", "-o", str(full)], capsys, "is not empty")


def test_eval_checks_come_first(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture,
                                no_model_load: None) -> None:
    _fails(["eval", str(tmp_path / "missing"), "--reference", "smollm2-135m"], capsys, "no such file")
    _fails(["eval", str(tiny), "--data", "nope.txt"], capsys, "neither a known name")
    _fails(["eval", str(tiny), "--max-windows", "0"], capsys, "--max-windows must be >= 1")
    _fails(["eval", str(tiny), "--data", "c4"], capsys, "C4 is calibration data")


def test_messages_keep_their_brackets(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.core.errors import LowbitError

    def fail(*a, **k):  # type: ignore[no-untyped-def]
        raise LowbitError("install it: pip install 'lowbit[llamacpp]'")

    import lowbit.cli.quantize as cq

    monkeypatch.setattr(cq, "recipe_from_args", fail)
    err = _fails(["quantize", str(tiny), "--scheme", "W4A16", "-o", str(tmp_path / "o")], capsys, "lowbit[")
    assert "pip install 'lowbit[llamacpp]'" in err


def test_global_options_before_or_after_the_command(tmp_path: Path, tiny: Path) -> None:
    for args in (["--no-progress", "-v", "quantize", str(tiny), "--scheme", "W8A16", "-o", str(tmp_path / "a")],
                 ["quantize", str(tiny), "--scheme", "W8A16", "-o", str(tmp_path / "b"), "--no-progress", "-v"]):
        assert main(args) == 0


def test_help_shows_defaults_and_examples(capsys: pytest.CaptureFixture) -> None:
    for cmd in ("run", "quantize", "eval", "gguf", "imatrix", "serve", "models"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"lowbit {cmd}" in out, cmd
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    assert "NF4" in out and "FP8_DYNAMIC" in out and "default" in out


def test_artifact_is_readable_by_other_users(tmp_path: Path, tiny: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "a"
        assert main(["--no-progress", "quantize", str(tiny), "--scheme", "W8A16", "-o", str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_plain_progress_lines_off_a_terminal(tmp_path: Path, tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lowbit.core.progress import progress

    with caplog.at_level(logging.INFO, logger="lowbit.progress"), progress("blocks", 3, every=0.0) as t:
        for _ in range(3):
            t.advance()
    lines = [r.getMessage() for r in caplog.records if r.name == "lowbit.progress"]
    assert lines[-1].startswith("blocks: 3/3 (100%)") and "ETA" in lines[-1] and len(lines) == 3


def _texts(n: int) -> list[str]:
    return [f"document {i} says the quick brown fox jumps over the lazy dog" for i in range(n)]


def test_calibration_sources(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lowbit.data import resolve_calib_texts
    from lowbit.data.sources import sample_documents

    docs = _texts(50)
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    pqf = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": docs}), pqf)
    assert resolve_calib_texts(str(jl)) == docs == resolve_calib_texts(str(pqf))
    assert resolve_calib_texts(f"c4:{jl}") == docs
    sample, n = sample_documents(iter(docs), cap=10, seed=1)
    assert n == 50 and len(sample) == 10 and set(sample) <= set(docs)
    assert sample == sample_documents(iter(docs), cap=10, seed=1)[0] != sample_documents(iter(docs), 10, 2)[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl line 2 has no string field 'text'"):
        resolve_calib_texts(str(bad))


def test_hf_datasets_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from lowbit.data import resolve_calib_texts, resolve_eval_text

    seen = {}

    def load_dataset(name, config=None, split=None):  # type: ignore[no-untyped-def]
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"text": _texts(5)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert resolve_calib_texts("hf:allenai/c4:en:validation") == _texts(5)
    assert seen == {"name": "allenai/c4", "config": "en", "split": "validation"}
    label, text = resolve_eval_text("hf:wikitext:wikitext-2-raw-v1:test")
    assert label == "hf:wikitext:wikitext-2-raw-v1:test" and text == "\n\n".join(_texts(5))
    with pytest.raises(Exception, match="hf:NAME"):
        resolve_calib_texts("hf:")


def test_default_calibration_fallback_is_recorded(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import lowbit.data.corpora as corpora

    monkeypatch.setattr(corpora, "_find", lambda rel: None)  # no C4 sample anywhere
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    out = tmp_path / "q"
    with caplog.at_level(logging.WARNING):
        assert main(["--no-progress", "quantize", str(tiny), "--scheme", "W4A16", "--group-size", "32",
                     "--method", "imatrix-rtn", "--calib-samples", "2", "--calib-len", "32", "-o", str(out)]) == 0
    assert "C4 sample was not found" in caplog.text and "calibrating on CPython's documentation" in caplog.text
    assert "corpus: python-docs" in (out / "recipe.yaml").read_text()
    rec = json.loads((out / "provenance.json").read_text())
    assert rec["calibration"]["fallback"] == "c4 not found; used python-docs"


# -- found by scripts/bad_inputs.py (docs/errors.md): each was a traceback, a late check or an unclear line --
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["quantize", "m", "-o", "o", "--method", "foo"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "invalid choice: 'foo'" in err and "see `lowbit quantize --help`" in err


@pytest.mark.parametrize(("args", "needle"), [
    (["serve", "{m}", "--device", "tpu"], "--device 'tpu' is not a device name"),  # was a torch traceback
    (["qat", "{m}", "--scheme", "W4A16", "--device", "cuda", "-o", "{o}"], "no CUDA GPU"),  # was after the load
    (["qat", "{m}", "--scheme", "W4A16", "--lr", "-1", "-o", "{o}"], "--lr must be >= 0"),
    (["qat", "{m}", "--scheme", "W4A16", "--checkpoint-every", "-5", "-o", "{o}"], "--checkpoint-every must be >= 0"),
    (["quantize", "{m}", "--scheme", "W4A16", "--max-ppl-increase", "5", "--eval-ctx", "1", "-o", "{o}"],
     "--eval-ctx must be >= 2"),
    (["quantize", "{m}", "--recipe", "{d}", "-o", "{o}"], "is a folder; give the recipe's file"),
    (["imatrix", "{m}", "--seed", "-1", "-o", "{o}.gguf"], "--seed must be >= 0"),
    (["sensitivity", "{m}", "--calib", "{d}/missing.txt", "-o", "{o}.json"], "neither a known name"),
    (["sensitivity", "{m}", "--imatrix", "{f}", "-o", "{o}.json"], "imatrix"),
    (["sensitivity", "{m}", "--measure", "2", "--measure-tensors", "(", "-o", "{o}.json"], "not a regular expression"),
    (["sensitivity", "{m}", "--measure", "-1", "-o", "{o}.json"], "--measure must be >= 0"),
    (["eval", "{m}", "--data", "{blank}"], "is empty or blank"),
    (["doctor", "{f}"], "neither an artifact folder"),  # was exit 1 with a table
    (["doctor", "{d}"], "neither an artifact folder"),
    (["doctor", "{m}", "--reference", "{d}/missing"], "no such file or folder"),  # was after loading the artifact
    (["compare", "{m}", "-o", "{o}", "--ctx", "1"], "--ctx must be >= 2"),
    (["compare", "{m}", "-o", "{o}", "--threads", "0"], "--threads must be >= 1"),
    (["compare", "{m}", "-o", "{o}", "--max-size", "-1"], "--max-size must be > 0"),
    (["compare", "{m}", "-o", "{o}", "--tasks", "mmlu"], "unknown task 'mmlu'"),
    (["compare", "{m}", "-o", "{o}", "--configs", "mix@0.5"], "bits per weight must lie in (1, 32]"),
    (["compare", "{m}", "-o", "{o}", "--configs", "W4A16:magic"], "config 'W4A16:magic': method.name: unknown"),
])
def test_found_by_the_bad_inputs_table(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture,
                                       no_model_load: None, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                       needle: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("not a model")
    f = tmp_path / "notes.txt"
    f.write_text("junk, not an imatrix nor a model")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n")
    subs = {"{m}": str(tiny), "{o}": str(tmp_path / "out"), "{d}": str(d), "{f}": str(f), "{blank}": str(blank)}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    err = _fails(argv, capsys, needle)
    assert len(err.strip().splitlines()) == 1 or all(" INFO " in ln for ln in err.strip().splitlines()[:-1]), err
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_overlap_is_refused_before_the_ptq(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.qat.job as job

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the PTQ ran before the overlap check")

    monkeypatch.setattr(job, "prepare", boom)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"line {i} the quick brown fox jumps over the lazy dog" for i in range(300)))
    _fails(["qat", str(tiny), "--scheme", "W4A16", "--group-size", "32", "--method", "gptq", "--steps", "1",
            "--seq-len", "16", "--samples", "4", "--calib", str(text), "--data", str(text), "-o", str(tmp_path / "o")],
           capsys, "inflates every result")


def test_ollama_modelfile_under_a_file_is_one_line(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture) -> None:
    gguf = tmp_path / "m.gguf"
    assert main(["--no-progress", "gguf", str(tiny), "--type", "Q8_0", "-o", str(gguf)]) == 0
    capsys.readouterr()
    f = tmp_path / "a.txt"
    f.write_text("x")
    _fails(["export", "ollama", str(gguf), "-o", str(f / "Modelfile")], capsys, "is not a writable folder")


def test_builtin_corpora_found_from_outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `--calib c4` and the default WikiText-2 work from any directory: the data folder beside the
    checkout is searched, not only ../shared/data of the current directory."""
    from lowbit.data.corpora import C4_REL, WIKITEXT2_TEST_REL, find_data_file

    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (beside / C4_REL).is_file():
        pytest.skip(f"no data folder beside the checkout ({beside})")
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    assert find_data_file(C4_REL) == (beside / C4_REL).resolve()
    assert find_data_file(WIKITEXT2_TEST_REL) == (beside / WIKITEXT2_TEST_REL).resolve()
