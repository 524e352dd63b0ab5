"""lowbit compare: config names, the recommendation rule, an end-to-end run, and resuming after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_tiny_model_dir
from lowbit.compare import Limits, parse_config, parse_menu, recommend
from lowbit.compare.recommend import pareto
from lowbit.core.errors import LowbitError
from lowbit.core.presets import lookup_scheme
from lowbit.recipe import AWQConfig, GPTQConfig, ImatrixConfig


def test_config_names() -> None:
    c = parse_config("W4A16:gptq")
    assert c.kind == "recipe" and c.recipe is not None and c.recipe.scheme == lookup_scheme("W4A16")
    assert isinstance(c.recipe.method, GPTQConfig)
    assert isinstance(parse_config("W4A16:awq+gptq").recipe.method.inner, GPTQConfig)  # type: ignore[union-attr]
    assert isinstance(parse_config("W4A16:imatrix-rtn").recipe.method, ImatrixConfig)  # type: ignore[union-attr]
    g = parse_config("gguf:q4_k_m+imatrix")
    assert (g.kind, g.gguf_type, g.imatrix, g.family) == ("gguf", "Q4_K_M", True, "gguf")
    assert parse_config("mix@4.5").budget == 4.5 and parse_config("gguf:mix@4.9").budget == 4.9
    assert parse_config("W3A16:awq+qat").qat and isinstance(parse_config("W3A16:awq").recipe.method, AWQConfig)  # type: ignore[union-attr]
    for bad, msg in (("W5A16", "unknown scheme"), ("NF4:gptq", "does not quantize"), ("gguf:Q9", "unknown GGUF"),
                     ("gguf:Q4_0+qat", "QAT configs")):
        with pytest.raises(LowbitError, match=msg):
            parse_config(bad)
    menu = parse_menu("W8A16,gguf:Q8_0")
    assert [c.name for c in menu] == ["reference", "W8A16", "gguf:Q8_0"]
    with pytest.raises(LowbitError, match="twice"):
        parse_menu("W8A16,W8A16")
    assert len(parse_menu(None, "full")) > len(parse_menu(None, "default")) == 11


ROWS = [
    {"name": "reference", "size_bytes": 1000, "ppl_increase_pct": 0.0, "kld": 0.0, "decode_tokens_per_s": 10.0,
     "peak_memory_bytes": 2000},
    {"name": "a8", "size_bytes": 500, "ppl_increase_pct": 0.2, "kld": 0.01, "decode_tokens_per_s": 12.0,
     "peak_memory_bytes": 1500, "bits_per_weight": 8.5},
    {"name": "b4", "size_bytes": 300, "ppl_increase_pct": 3.0, "kld": 0.10, "decode_tokens_per_s": 20.0,
     "peak_memory_bytes": 1200, "bits_per_weight": 4.5},
    {"name": "c4", "size_bytes": 310, "ppl_increase_pct": 6.0, "kld": 0.20, "decode_tokens_per_s": 25.0,
     "peak_memory_bytes": 1200, "bits_per_weight": 4.6},
    {"name": "d3", "size_bytes": 250, "ppl_increase_pct": 12.0, "kld": 0.40, "decode_tokens_per_s": 30.0,
     "peak_memory_bytes": 1100, "bits_per_weight": 3.5},
]


def test_recommendation_rule() -> None:
    r = recommend(ROWS, Limits())  # no limit: perplexity within +5%, smallest wins
    assert r["name"] == "b4" and r["runner_up"]["name"] == "a8" and r["default_limit"]
    assert "smallest that keeps perplexity within +5%" in r["reasons"]
    assert "2.00x the reference's decode" in r["reasons"]
    r = recommend(ROWS, Limits(max_ppl_increase=15))
    assert r["name"] == "d3"
    r = recommend(ROWS, Limits(max_size=320))  # no quality limit: the best quality that fits
    assert r["name"] == "b4" and r["runner_up"]["name"] == "c4"
    r = recommend(ROWS, Limits(min_decode_tps=22, max_ppl_increase=5))
    assert r["name"] is None and r["binding"] == "min_decode_tps" and "--min-decode-tps binds" in r["reasons"]
    r = recommend(ROWS, Limits(max_size=100))
    assert r["name"] is None and r["binding"] == "max_size" and r["closest"] == "d3"
    assert pareto(ROWS) == ["reference", "a8", "b4", "d3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("t") / "m", "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("d") / "wiki.txt"
    p.write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(400)))
    return p


def _args(tiny: Path, corpus: Path, out: Path, configs: str) -> list[str]:
    return ["--no-progress", "compare", str(tiny), "--configs", configs, "--calib", str(corpus), "--calib-samples",
            "4", "--calib-len", "32", "--data", str(corpus), "--ctx", "64", "--windows", "2", "--new-tokens", "4",
            "--reps", "1", "-o", str(out)]


def test_compare_end_to_end(tmp_path: Path, tiny: Path, corpus: Path) -> None:
    from lowbit.cli import main

    out = tmp_path / "cmp"
    assert main(_args(tiny, corpus, out, "W8A16,W4A16,gguf:Q8_0")) == 0
    rep = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    assert set(rows) == {"reference", "W8A16", "W4A16", "gguf:Q8_0"}
    for r in rows.values():
        for k in ("size_bytes", "bits_per_weight", "ppl", "kld", "top1", "prefill_tokens_per_s",
                  "decode_tokens_per_s", "peak_memory_bytes", "engine", "recipe"):
            assert k in r, (r["name"], k)
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
    assert rows["gguf:Q8_0"]["engine"].startswith("llama.cpp")
    # W4A16 at group 64 runs on torch's packed int4 CPU kernel, not a dequantized dense matmul
    assert rows["W4A16"]["dequantized"] is False and "int4pack" in rows["W4A16"]["kernel"]
    assert rows["W4A16"]["size_bytes"] < rows["W8A16"]["size_bytes"] < rows["reference"]["size_bytes"]
    assert rows["W8A16"]["kld"] < rows["W4A16"]["kld"]  # 8 bits per weight lose less than 4
    assert rows["W4A16"]["recipe"]["scheme"]["group_size"] == 64  # 128 does not divide the tiny model's 64
    assert rep["recommendation"]["name"] in rows and rep["recommendation"]["reasons"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Recommendation" in html
    assert "| W4A16 |" in (out / "report.md").read_text()


def test_compare_resumes_after_a_kill(tmp_path: Path, tiny: Path, corpus: Path) -> None:
    """SIGKILL while it runs; the same command then finishes without rebuilding what was done."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "lowbit.cli", *_args(tiny, corpus, out, "W8A16,W4A16,W4A16_ASYM,gguf:Q8_0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src")))
    done: list[Path] = []
    deadline = time.time() + 300
    while time.time() < deadline and len(done) < 2 and proc.poll() is None:
        done = sorted(out.glob("configs/*/result.json"))
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(done) >= 2, "the run ended before two configs were built"
    before = {p.parent.name: json.loads(p.read_text())["build"] for p in done}
    from lowbit.cli import main

    assert main(_args(tiny, corpus, out, "W8A16,W4A16,W4A16_ASYM,gguf:Q8_0")) == 0
    for name, build in before.items():  # built once: the same seconds, the same artifact
        assert json.loads((out / "configs" / name / "result.json").read_text())["build"] == build
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["rows"]) == 5 and all(r["ppl"] is not None for r in rep["rows"])


def test_compare_refuses_a_foreign_folder(tmp_path: Path, tiny: Path, corpus: Path) -> None:
    from lowbit.cli import main

    out = tmp_path / "x"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(_args(tiny, corpus, out, "W8A16")) == 2
    assert (out / "mine.txt").read_text() == "keep"


def test_compare_budgets_qat_and_tasks(tmp_path: Path, tiny: Path, corpus: Path) -> None:
    """Budgeted configs (compressed-tensors and GGUF), a +qat config and zero-shot tasks in one compare: each
    builds through its own package, lands in the report, and the budgets hold."""
    from lowbit.cli import main
    from tasks_data import task_specs, write_task_files

    train = tmp_path / "train.txt"  # QAT's training text must be disjoint from the evaluation text
    train.write_text("\n\n".join(f"note {i}: a slow green turtle walks under the bright moon." for i in range(400)))
    tasks = ",".join(s for s in task_specs(write_task_files(tmp_path / "tasks")) if s.startswith(("arc_easy", "piqa")))
    out = tmp_path / "cmp"
    args = _args(tiny, corpus, out, "W4A16,mix@6,gguf:mix@6,W4A16+qat")
    args[args.index("--calib") + 1] = str(train)
    assert main([*args, "--tasks", tasks, "--qat-steps", "3", "--no-speed"]) == 0
    rep = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    assert set(rows) == {"reference", "W4A16", "mix@6", "gguf:mix@6", "W4A16+qat"}
    for r in rows.values():
        assert set(r["tasks"]) == {"arc_easy", "piqa"}, r["name"]
        assert 0 <= r["tasks"]["arc_easy"]["acc"] <= 1 and r["tasks"]["piqa"]["n_docs"] == 3
    # compressed-tensors budgets count the quantized linears (as W4A16 is named 4.25), GGUF budgets the file
    assert rows["W4A16"]["size_bytes"] < rows["mix@6"]["size_bytes"] < rows["reference"]["size_bytes"]
    assert rows["gguf:mix@6"]["bits_per_weight"] <= 6 + 1e-9
    overrides = rows["mix@6"]["recipe"]["overrides"]
    assert overrides, "a budget above every uniform 4-bit scheme must spend bits on some layers"
    assert rows["W4A16+qat"]["recipe"]["scheme"] == rows["W4A16"]["recipe"]["scheme"]
    qat = json.loads((Path(rows["W4A16+qat"]["path"]) / "qat.json").read_text())
    assert qat["steps"] == 3, qat
    assert "arc_easy" in (out / "report.md").read_text()


def test_speed_worker_reports_its_own_peak_memory() -> None:
    """The speed worker is a child of a large process (the compare run holding the reference model): its peak
    must be its own. ``ru_maxrss`` survives fork + exec on Linux, so every config once showed the parent's."""
    import numpy as np

    held = np.ones(2**30 // 8)  # the parent touches 1 GiB
    code = "from lowbit.compare.speed import _rss_peak; print(_rss_peak())"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                               check=True).stdout)
    assert child < 2**30 * 0.75, child  # the child imports torch (a few hundred MB) but never held the GiB
    assert held.sum() == 2**30 // 8
