"""Parity with lm-evaluation-harness 0.4 itself: its prompts, its log-likelihoods, its metrics and errors.

lm-eval reads the same documents through task YAMLs that include its own task files
(:func:`lowbit.eval.lm_eval_bridge.write_lm_eval_tasks`), so its prompt construction runs, and scores
the same tiny model through ``HFLM`` at batch size 1. Log-likelihoods agree within float32
reassociation (see tests/test_tasks.py: 1e-3 nats), every per-document choice and every metric
exactly, the standard errors to rounding (the perplexity's bootstrap draws the same resamples).
Needs lm-eval (``pip install 'lowbit[eval]'``): skipped, with this reason shown by ``-ra``, without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'lowbit[eval]'")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conftest import make_tiny_model_dir  # noqa: E402
from lowbit.cli import main  # noqa: E402
from lowbit.eval.lm_eval_bridge import run_lm_eval, write_lm_eval_tasks  # noqa: E402
from lowbit.eval.tasks import evaluate_tasks, load_tasks  # noqa: E402
from lowbit.eval.tasks.metrics import choose  # noqa: E402
from tasks_data import task_specs, write_task_files  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lm_eval")
    tasks = load_tasks(task_specs(write_task_files(root / "data")))
    names = write_lm_eval_tasks(tasks, root / "yaml")
    model_dir = make_tiny_model_dir(root / "tiny", "llama", max_position_embeddings=512)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return {"tasks": tasks, "names": names, "yaml": root / "yaml", "model": model,
            "tok": AutoTokenizer.from_pretrained(model_dir), "dir": model_dir}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # get_task_dict: the API every 0.4.x has
def test_requests_are_lm_evals(setup: dict[str, Any]) -> None:
    from lm_eval.tasks import TaskManager, get_task_dict

    task_dict = get_task_dict(setup["names"], TaskManager(include_path=str(setup["yaml"])))
    for task in setup["tasks"]:
        theirs = task_dict[f"lowbit_{task.name}"]
        theirs.build_all_requests(rank=0, world_size=1)
        args: dict[int, list[tuple[str, str]]] = {}
        for inst in theirs.instances:
            args.setdefault(inst.doc_id, []).append(tuple(inst.arguments))  # type: ignore[arg-type]
        assert [tuple(args[d]) for d in sorted(args)] == [doc.requests for doc in task.docs], task.name


def test_scores_metrics_and_stderr_are_lm_evals(setup: dict[str, Any]) -> None:
    ours = evaluate_tasks({"m": setup["model"]}, setup["tok"], setup["tasks"], progress=False)["m"]
    res = run_lm_eval(setup["model"], setup["tok"], setup["names"], include_path=setup["yaml"], log_samples=True)
    for task in setup["tasks"]:
        name = f"lowbit_{task.name}"
        mine = ours[task.name]
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        for d, (doc, s) in enumerate(zip(task.docs, samples, strict=True)):
            lls = [float(r[0]) for r in s["filtered_resps"]]
            assert mine.loglikelihoods[d] == pytest.approx(lls, abs=1e-3)
            if task.spec.output == "multiple_choice":
                pred, pred_norm = choose(lls, doc.choices)
                assert mine.predictions[d] == pred
                assert mine.predictions_norm is None or mine.predictions_norm[d] == pred_norm
            else:
                assert mine.predictions[d] == int(s["filtered_resps"][0][1])
        theirs = res["results"][name]
        for metric, value in mine.metrics.items():
            assert value == pytest.approx(theirs[f"{metric},none"], rel=1e-4 if metric == "perplexity" else 1e-12)
            assert mine.stderr[metric] == pytest.approx(theirs[f"{metric}_stderr,none"], rel=1e-4)


def test_cli_hands_the_loaded_model_to_lm_eval(setup: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    rc = main(["--no-progress", "eval", str(setup["dir"]), "--lm-eval", "lowbit_arc_easy,lowbit_piqa",
               "--lm-eval-include", str(setup["yaml"]), "--limit", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "lowbit_arc_easy" in printed and "acc_norm" in printed  # lm-eval's own table
    import json

    res = json.loads(out.read_text())["lm_eval"]["tiny"]["results"]
    assert "acc,none" in res["lowbit_piqa"]
    assert set(res) == {"lowbit_arc_easy", "lowbit_piqa"}


def test_gguf_through_llamacpp_runs_in_lm_eval(setup: dict[str, Any], tmp_path: Path) -> None:
    """A GGUF by llama.cpp handed to HFLM (LlamaCppModule): lm-eval's scores equal lowbit's llama.cpp scores
    (1e-3: the same llama.cpp computation split into other batches)."""
    from lowbit.eval.llamacpp import LlamaCppLogits
    from lowbit.formats.gguf.writer import write_gguf

    gguf = LlamaCppLogits(write_gguf(setup["dir"], tmp_path / "m.gguf", "F32").path, ctx=512, threads=1)
    tasks = setup["tasks"][:2]
    ours = evaluate_tasks({"g": gguf}, setup["tok"], tasks, progress=False)["g"]
    res = run_lm_eval(gguf, setup["tok"], [f"lowbit_{t.name}" for t in tasks], include_path=setup["yaml"],
                      log_samples=True)
    for task in tasks:
        samples = sorted(res["samples"][f"lowbit_{task.name}"], key=lambda s: s["doc_id"])
        for d, s in enumerate(samples):
            assert ours[task.name].loglikelihoods[d] == pytest.approx([float(r[0]) for r in s["filtered_resps"]],
                                                                      abs=1e-3)
    gguf.close()


def test_quantized_artifact_through_lm_eval(setup: dict[str, Any], tmp_path: Path) -> None:
    """A lowbit W4A16 artifact loaded back from disk (lowbit's runtime linears) scores the same in lowbit and in
    lm-eval's HFLM (which re-ties the weights of the instance it is handed)."""
    from lowbit.jobs import load_artifact

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    out = tmp_path / "w4"
    assert main(["--no-progress", "quantize", str(setup["dir"]), "--scheme", "W4A16", "--group-size", "32",
                 "--calib", str(corpus), "--calib-samples", "2", "--calib-len", "16", "-o", str(out)]) == 0
    model = load_artifact(out)
    tasks = setup["tasks"][:3]
    ours = evaluate_tasks({"q": model}, setup["tok"], tasks, progress=False)["q"]
    res = run_lm_eval(model, setup["tok"], [f"lowbit_{t.name}" for t in tasks], include_path=setup["yaml"],
                      log_samples=True)
    for task in tasks:
        samples = sorted(res["samples"][f"lowbit_{task.name}"], key=lambda s: s["doc_id"])
        for d, s in enumerate(samples):
            assert ours[task.name].loglikelihoods[d] == pytest.approx([float(r[0]) for r in s["filtered_resps"]],
                                                                      abs=1e-3)
        assert ours[task.name].metrics["acc"] == res["results"][f"lowbit_{task.name}"]["acc,none"]
