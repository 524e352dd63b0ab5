"""Peer runs for the quality benches: each peer script runs in its tool's own python (a venv that
pins its own transformers) and leaves a fake-quantized float32 Hugging Face folder with a
``peer.json`` (``{"seconds": ...}``) that lowbit's harness evaluates like any model."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable
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


def reusable_seconds(art: Path, method: str, calib_samples: int, calib_len: int, seed: int,
                     same_options: Callable[[dict[str, Any]], bool]) -> float | None:
    """The quantize seconds of the lowbit artifact ``art`` when its recipe records ``method``, this
    calibration (C4 sample of ``calib_samples x calib_len`` drawn with ``seed``) and options ``same_options``
    accepts; None when it must be made again (or does not exist)."""
    f = art / "lowbit_recipe.json"
    if not f.exists():
        return None
    r = json.loads(f.read_text())
    same = (r.get("method") == method and r.get("calib_samples") == calib_samples
            and r.get("calib_len") == calib_len and r.get("seed", 0) == seed and same_options(r))
    return float(r["quantize_seconds"]) if same else None


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
