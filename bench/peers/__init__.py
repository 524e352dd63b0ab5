"""Peer runs for the quality benches: each peer script runs in its tool's own python (a venv that
pins its own transformers) and leaves a fake-quantized float32 Hugging Face folder with a
``peer.json`` (``{"seconds": ...}``) that lowbit's harness evaluates like any model."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

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
