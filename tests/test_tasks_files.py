"""Zero-shot task files: lm-eval's prompts from every layout, each bad input's one-line error, the CLI and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_model_dir
from lowbit.cli import main
from lowbit.core.errors import DataError
from lowbit.eval.tasks import load_task, parse_tasks
from lowbit.eval.tasks.hellaswag import make_doc as hellaswag_doc
from tasks_data import LAMBADA, write_task_files


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return write_task_files(tmp_path / "data")


def test_prompts_are_lm_evals(files: dict[str, Path]) -> None:
    hs = load_task("hellaswag", files["hellaswag"])
    # lm-eval's preprocess: [..] dropped, " [title]" -> ". ", double spaces collapsed
    assert hs.docs[1].requests[0] == ("Family Life: How to entertain a toddler. Visit a site like to find games.",
                                      " Choose small. simple games.")
    assert hs.docs[1].choices[1:] == ("Ask the toddler what he would like.", "Go out.", "Sleep now.")
    assert [d.gold for d in hs.docs] == [3, 1, 2]
    hub = hellaswag_doc({"activity_label": "Canoeing", "ctx_a": "Two women sit.", "ctx_b": "the CHILD",
                         "endings": ["a", "b"], "label": "1"}, "x")
    assert hub.requests[0] == ("Canoeing: Two women sit. The child", " a")  # ctx_b.capitalize(), as lm-eval
    arc = load_task("arc_challenge", files["arc_challenge"])
    assert arc.docs[2].requests[1] == ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide")
    assert arc.docs[2].row["choices"]["label"] == ["A", "B", "C"] and arc.docs[2].row["answerKey"] == "B"
    piqa = load_task("piqa", files["piqa"])
    assert piqa.docs[1].requests[0] == ("Question: dresser\nAnswer:", " replace drawer with bobby pin ")
    assert [d.gold for d in piqa.docs] == [0, 1, 0]
    wg = load_task("winogrande", files["winogrande"])
    stem, target = "Sarah was a much better surgeon than Maria so ", " always got the easier cases."
    assert wg.docs[0].requests == ((stem + "Sarah", target), (stem + "Maria", target))
    assert wg.docs[0].row == {"sentence": stem + "_" + target, "option1": "Sarah", "option2": "Maria", "answer": "2"}
    assert wg.docs[2].row["option1"] == "plant" and wg.docs[2].requests[0][1] == " ."
    lam = load_task("lambada_openai", files["lambada_openai"], limit=2)
    assert lam.docs[0].requests == (("the quick brown fox jumps over the lazy", " dog"),)
    assert len(lam.docs) == 2 and LAMBADA[1].endswith(lam.docs[1].requests[0][1])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD = {  # task, file name, content, the message's file:line and words
    "wrong layout": ("arc_easy", "a.jsonl", '{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": "Q"}\n',
                     ":2:", "field 'choices' missing"),
    "gold out of range": ("arc_easy", "a.jsonl", '{"query": "Q", "choices": ["a", "b"], "gold": 7}\n', ":1:",
                          "field 'gold' = 7 is out of range for 2 choices"),
    "empty file": ("winogrande", "w.jsonl", "\n\n", "w.jsonl", "empty file"),
    "invalid json": ("lambada_openai", "l.jsonl", '{"text": "a b"}\n{"text": "a b"}\n{"text": \n', ":3:",
                     "not valid JSON"),
    "wrong type": ("lambada_openai", "l.jsonl", '{"text": 5}\n', ":1:", "field 'text' is int"),
    "hellaswag partial item": ("hellaswag", "h.txt", "A: b\n0\n1\n2\n3\n4\nC: d\n1\n", ":7:", "incomplete item"),
    "hellaswag gold": ("hellaswag", "h.txt", "A: b\nx\n1\n2\n3\n4\n", ":2:", "field 'gold'"),
    "hellaswag gold range": ("hellaswag", "h.txt", "A: b\n4\n1\n2\n3\n4\n", ":2:", "out of range for 4 choices"),
    "winogrande answer": ("winogrande", "w.jsonl", '{"sentence": "a _ b", "option1": "x", "option2": "y", '
                          '"answer": "3"}\n', ":1:", "field 'answer' = '3' is out of range"),
    "winogrande blank": ("winogrande", "w.jsonl", '{"sentence": "a b", "option1": "x", "option2": "y", '
                         '"answer": "1"}\n', ":1:", "no '_' blank"),
    "arc answerKey": ("arc_easy", "a.jsonl", '{"question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, '
                      '"answerKey": "E"}\n', ":1:", "field 'answerKey' = 'E' is not one of the labels"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_file_line_and_field(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    task, name, text, where, words = BAD[case]
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        load_task(task, path)
    assert f"{path.name}{where}" in str(err.value) or where in str(err.value)
    assert words in str(err.value) and str(path) in str(err.value)
    # the CLI: one line, exit 2, before any model is loaded (loading SmolLM2 would take seconds and print)
    assert main(["eval", "smollm2-135m", "--tasks", f"{task}={path}"]) == 2
    out = capsys.readouterr().err.strip()
    assert words in out and len(out.splitlines()) == 1


def test_piqa_labels_file_short(tmp_path: Path, files: dict[str, Path]) -> None:
    labels = files["piqa"].with_name("valid-labels.lst")
    labels.write_text("0\n1\n")
    with pytest.raises(DataError, match=r"valid-labels\.lst:3: missing label"):
        load_task("piqa", files["piqa"])
    labels.unlink()
    with pytest.raises(DataError, match=r"valid\.jsonl:1: field 'label' missing and no labels file"):
        load_task("piqa", files["piqa"])


def test_task_names_and_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_tasks("arc_easy, piqa=/x/y.jsonl") == [("arc_easy", None), ("piqa", Path("/x/y.jsonl"))]
    for bad, words in (("nope", "unknown task 'nope'"), ("piqa=", "has no path"), ("piqa,piqa", "listed twice")):
        with pytest.raises(DataError, match=words):
            parse_tasks(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_task("piqa", tmp_path / "missing.jsonl")
    assert main(["eval", "smollm2-135m", "--tasks", "mmlu"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err
    assert main(["eval", "smollm2-135m", "--limit", "5"]) == 2
    assert "--limit goes with --tasks" in capsys.readouterr().err


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_tiny_model_dir(tmp_path / "tiny", "llama", max_position_embeddings=512)


def test_cli_tasks_json_layout(tmp_path: Path, tiny: Path, files: dict[str, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    other = make_tiny_model_dir(tmp_path / "other", "llama", seed=1, max_position_embeddings=512)
    out = tmp_path / "r.json"
    tasks = ",".join(f"{n}={p}" for n, p in files.items())
    rc = main(["--no-progress", "eval", str(other), "--reference", str(tiny), "--tasks", tasks, "--limit", "2",
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "zero-shot tasks" in printed and "windows" not in printed  # tasks alone: no perplexity
    res = json.loads(out.read_text())
    assert set(res) == {"tasks"} and set(res["tasks"]) == {"reference", "other"}
    arc = res["tasks"]["other"]["arc_easy"]
    assert set(arc["metrics"]) == set(arc["stderr"]) == {"acc", "acc_norm"}
    assert len(arc["predictions"]) == len(arc["predictions_norm"]) == len(arc["gold"]) == arc["n_docs"] == 2
    assert all(p in range(4) for p in arc["predictions"]) and arc["source"] == str(files["arc_easy"])
    assert set(arc["difference"]) == {"acc", "acc_norm"} and 0.0 <= arc["agreement"] <= 1.0
    assert res["tasks"]["reference"]["arc_easy"]["difference"] is None
    lam = res["tasks"]["other"]["lambada_openai"]
    assert set(lam["metrics"]) == {"perplexity", "acc"} and lam["predictions_norm"] is None
    assert res["tasks"]["other"]["winogrande"]["metrics"].keys() == {"acc"}


def test_cli_tasks_with_perplexity(tmp_path: Path, tiny: Path, files: dict[str, Path]) -> None:
    corpus = _write(tmp_path / "c.txt", "the quick brown fox jumps over the lazy dog\n" * 40)
    out = tmp_path / "r.json"
    rc = main(["--no-progress", "eval", str(tiny), "--data", str(corpus), "--ctx", "32", "--max-windows", "2",
               "--tasks", f"piqa={files['piqa']}", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"tasks", "corpus", "results"} and res["results"]["tiny"]["n_windows"] == 2
    assert res["tasks"]["tiny"]["piqa"]["n_docs"] == 3
