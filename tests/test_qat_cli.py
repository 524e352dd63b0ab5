"""``lowbit qat`` and the threshold gate (``lowbit quantize --max-ppl-increase``) end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_model_dir
from lowbit.cli import main
from lowbit.jobs.gate import Gate, verdict

TRAIN = ["the quick brown fox jumps over the lazy dog and runs far away into the green hills",
         "low bit quantization keeps the model small and the answers good for every user",
         "a tiny model for tests has two layers and a small vocabulary of bytes and merges"]
EVAL = ["hello world this is a test of the tokenizer with words the model never trained on",
        "quiet rivers bend past old mills where millers once ground wheat into white flour"]


def _texts(tmp_path: Path) -> tuple[Path, Path]:
    train, ev = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text("\n\n".join(t for _ in range(6) for t in TRAIN))
    ev.write_text("\n\n".join(t for _ in range(20) for t in EVAL))
    return train, ev


def _qat(tmp_path: Path, model: Path, out: Path, *extra: str) -> int:
    train, ev = _texts(tmp_path)
    return main(["qat", str(model), "--scheme", "W2A16", "--group-size", "16", "--steps", "3", "--seq-len", "16",
                 "--samples", "6", "--calib", str(train), "--data", str(ev), "--eval-ctx", "64", "--no-progress",
                 "--checkpoint-every", "2", "--no-compile", "-o", str(out), *extra])


def test_qat_writes_an_artifact_with_its_training_log(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "m", "llama")
    out = tmp_path / "out"
    assert _qat(tmp_path, model, out) == 0
    log = [json.loads(line) for line in (out / "qat_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(e["loss"] > 0 for e in log)
    qat = json.loads((out / "qat.json").read_text())
    assert qat["overlap"]["eval_corpus"].endswith("eval.txt") and qat["overlap"]["shared"] == 0
    assert qat["config"]["train"]["loss"] == "kd" and qat["steps"] == 3
    assert json.loads((out / "provenance.json").read_text())["qat"]["steps"] == 3
    assert (out / "recipe.yaml").is_file() and not (tmp_path / "out.checkpoint").exists()
    from lowbit.jobs.artifacts import artifact_kind

    assert artifact_kind(out) == "compressed-tensors"


def test_failed_gate_keeps_the_artifact_aside(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_tiny_model_dir(tmp_path / "m", "llama")
    out = tmp_path / "out"
    assert _qat(tmp_path, model, out, "--max-ppl-increase", "0") == 3
    assert not out.exists()
    gate = json.loads((tmp_path / "out.failed-gate" / "gate.json").read_text())
    assert gate["passed"] is False and gate["perplexity"]["increase_pct"] > 0
    assert "missed by" in capsys.readouterr().err
    # PTQ through the same gate: a generous threshold passes and the artifact reaches -o
    _, ev = _texts(tmp_path)
    ok = tmp_path / "ptq"
    assert main(["quantize", str(model), "--scheme", "W4A16", "--group-size", "32", "--data", str(ev), "--eval-ctx",
                 "64", "--max-ppl-increase", "1000", "--no-progress", "-o", str(ok)]) == 0
    assert json.loads((ok / "gate.json").read_text())["passed"] is True
    assert main(["quantize", str(model), "--scheme", "W2A16", "--group-size", "16", "--data", str(ev), "--eval-ctx",
                 "64", "--max-ppl-increase", "0", "--no-progress", "-o", str(tmp_path / "bad")]) == 3
    assert not (tmp_path / "bad").exists() and (tmp_path / "bad.failed-gate").is_dir()


def test_training_on_the_evaluation_text_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_tiny_model_dir(tmp_path / "m", "llama")
    _, ev = _texts(tmp_path)
    code = main(["qat", str(model), "--scheme", "W4A16", "--group-size", "32", "--steps", "1", "--seq-len", "16",
                 "--calib", str(ev), "--data", str(ev), "--no-progress", "--no-compile", "-o", str(tmp_path / "out")])
    assert code == 2 and "inflates every result" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gate_verdict_says_by_how_much() -> None:
    report = {"perplexity": {"corpus": "wikitext2", "ctx": 2048, "windows": 4, "reference": 20.0, "artifact": 23.0,
                             "increase_pct": 15.0}, "tasks": {"arc_easy": {"artifact": 0.5, "reference": 0.6}}}
    misses = verdict(report, Gate(max_ppl_increase=10.0, min_task_acc={"arc_easy": 0.55}))
    assert "+15.00%" in misses[0] and "missed by 5.00 points" in misses[0]
    assert "arc_easy accuracy 0.5000 below 0.5500 by 0.0500" == misses[1]
    assert verdict(report, Gate(max_ppl_increase=15.0)) == []
