"""``--resume``: a calibrated run killed at any point continues from its last finished block and writes the
same bytes as a run that was never stopped (every file but provenance.json, which holds timings).

The kill is simulated in-process by an exception raised inside the checkpoint's writes (after a given
number of ``torch.save`` calls: between blocks, or halfway through one block's files), which leaves the
folder as a SIGKILL would (a temporary file, or whole files and an older meta.json).
``bench/resume_kill.py`` does the same with real SIGKILLs of a SmolLM2 GPTQ run.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from conftest import make_tiny_model_dir
from lowbit.core.errors import LowbitError
from lowbit.core.presets import lookup_scheme
from lowbit.jobs.quantization import quantize
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline import checkpoint as ckpt_mod
from lowbit.pipeline.awq import AWQConfig
from lowbit.pipeline.checkpoint import resume_dir
from lowbit.pipeline.engine import Engine
from lowbit.recipe.schema import Calibration, Recipe


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())
            if f.name != "provenance.json"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("c") / "calib.txt"
    p.write_text("\n\n".join(f"sample {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(64)))
    return p


def _recipe(method: str, corpus: Path) -> Recipe:
    scheme = dataclasses.replace(lookup_scheme("W4A16"), group_size=32)
    cfg = GPTQConfig() if method == "gptq" else AWQConfig(inner=GPTQConfig(asym_alpha=0.0))
    return Recipe(scheme=scheme, method=cfg, calibration=Calibration(corpus=str(corpus), samples=2, length=24))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("m"), "llama", seed=2, num_hidden_layers=3)


_REFS: dict[str, object] = {}


def _reference(method: str, base: Path, corpus: Path, tmp: Path):  # type: ignore[no-untyped-def]
    if method not in _REFS:
        _REFS[method] = quantize(str(base), _recipe(method, corpus), tmp / f"ref-{method}",
                                 engine=Engine(device="cpu", progress=False))
    return _REFS[method]


@pytest.mark.parametrize("method, kill_after", [("gptq", 1), ("gptq", 4), ("awq+gptq", 3)])
def test_killed_run_resumes_byte_identical(tmp_path_factory, tmp_path, base, corpus, monkeypatch, method,
                                           kill_after):
    """kill_after: torch.save calls that complete (two per block), the next one dies halfway."""
    recipe = _recipe(method, corpus)
    ref = _reference(method, base, corpus, tmp_path_factory.mktemp("ref"))

    out = tmp_path / "out"
    real = ckpt_mod.torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > kill_after:
            f.write(b"half a file")
            raise Killed
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(Killed):
        quantize(str(base), recipe, out, engine=Engine(device="cpu", progress=False, checkpoint=True))
    monkeypatch.setattr(ckpt_mod.torch, "save", real)
    state = resume_dir(out)
    assert not out.exists() and (state / "meta.json").exists() == (kill_after >= 2)
    res = quantize(str(base), recipe, out, engine=Engine(device="cpu", progress=False, resume=True))
    assert _digests(res.path) == _digests(ref.path)
    assert not state.exists()  # removed once the artifact is written
    assert res.record["methods"] == ref.record["methods"]  # the accumulated reports came back too


def test_resume_refuses_another_run(tmp_path, base, corpus, monkeypatch):
    recipe = _recipe("gptq", corpus)
    real = ckpt_mod.torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 2:
            raise Killed
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(Killed):
        quantize(str(base), recipe, tmp_path / "out", engine=Engine(device="cpu", progress=False, checkpoint=True))
    monkeypatch.setattr(ckpt_mod.torch, "save", real)
    other = recipe.replace(calibration=dataclasses.replace(recipe.calibration, seed=5))
    with pytest.raises(LowbitError, match="belongs to another run"):
        quantize(str(base), other, tmp_path / "out", engine=Engine(device="cpu", progress=False, resume=True))
