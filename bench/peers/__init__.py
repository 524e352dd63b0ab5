"""Peer runs for the quality benches: each peer script runs in its tool's own python (a venv that
pins its own transformers) and leaves a fake-quantized float32 Hugging Face folder with a
``peer.json`` (``{"seconds": ...}``) that lowbit's harness evaluates like any model."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def peer_artifact(python: str, script: str, model_dir: str | Path, tokens_file: str | Path, bits: int, group: int,
                  out: Path, reuse: bool = False) -> float:
    """Run ``bench/peers/<script> MODEL_DIR TOKENS BITS GROUP OUT`` with ``python`` (unless ``reuse``
    and ``out`` already holds a finished run); returns the peer's own quantization seconds."""
    t0 = time.perf_counter()
    if reuse and (out / "peer.json").exists():
        log.info("reusing the peer's artifact %s", out)
    else:
        subprocess.run([python, str(Path(__file__).parent / script), str(model_dir), str(tokens_file), str(bits),
                        str(group), str(out)], check=True)
    seconds = float(json.loads((out / "peer.json").read_text())["seconds"])
    log.info("%s took %.0f s (wall %.0f s)", script, seconds, time.perf_counter() - t0)
    return seconds


def reusable_seconds(art: Path, recipe: Any) -> float | None:
    """The quantize seconds of the lowbit artifact ``art`` when it was made by ``recipe`` (its stored
    ``recipe.yaml`` equal to it, the storage dtype aside); None when it must be made again."""
    from lowbit.recipe import Recipe

    f, rec = art / "recipe.yaml", art / "provenance.json"
    if not f.exists() or not rec.exists():
        return None
    stored = Recipe.from_file(f)
    if stored.replace(export=recipe.export) != recipe:
        return None
    return float(json.loads(rec.read_text())["quantize_seconds"])


def machine() -> dict[str, Any]:
    """What a quality figure was measured on: the CPU (name, family/model/stepping, the ISA torch
    dispatches to), threads, library versions and lowbit's commit. lowbit's CPU results have differed
    across sessions' VMs for the same code and tokens (stop 20); this records what could explain it."""
    import platform

    import torch
    import transformers

    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key in ("model name", "cpu family", "model", "stepping", "microcode") and key not in cpu:
                cpu[key] = value
    except OSError:
        cpu["model name"] = platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "lowbit_commit": commit}
