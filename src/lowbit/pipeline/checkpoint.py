"""Per-block state of a calibrated run on disk, so a killed run resumes from its last finished block.

After block ``i`` the engine (:func:`lowbit.pipeline.blockwise.run_blockwise`) hands the block here:

    block-000i.pt   the block's whole state dict after quantization (dequantized weights, norms AWQ
                    folded scales into) and its quantized weights
    acts-000i.pt    the next block's inputs (quantized model, and the float model's when carried),
                    every method's accumulated state (GPTQ's layer losses, AWQ's scales ...) and
                    torch's RNG state
    meta.json       ``next_block = i + 1`` and the run's fingerprint

each written to a unique temporary name, fsync'ed, renamed, then the folder fsync'ed; ``meta.json`` goes
last, so it only ever names files that are whole. A resumed run restores blocks ``0..k-1`` and the
inputs of block ``k`` and goes on exactly where the killed one was: the same calibration tokens (their
SHA-256 is part of the fingerprint), the same arithmetic, so the same bytes. Temporary files a kill left
behind are removed when a run begins. The folder is the user's own (next to the output folder) and is
read with ``torch.load(weights_only=False)``: do not resume from a folder someone else wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.io import fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

VERSION = 1


def resume_dir(out: str | Path) -> Path:
    """Where the per-block state of a run writing ``out`` lives: a hidden folder next to it."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def _save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- any unreadable state file means the same fix
        raise LowbitError(f"saved state {path} cannot be read ({type(e).__name__}: {e}); delete "
                          f"{path.parent} and start the run again without --resume") from e


@dataclass
class Resumed:
    """What a resumed run starts from: the first block to quantize and the state after the ones before."""

    next_block: int
    weights: dict[str, Any]
    hidden: list[torch.Tensor]
    fp_hidden: list[torch.Tensor] | None


@dataclass
class BlockCheckpoint:
    """The per-block state of one run in ``folder``; ``fingerprint`` names what the run is (recipe, source).

    ``resume``: continue from what ``folder`` holds (it must be the same run); otherwise anything there
    is discarded and the run starts at block 0.
    """

    folder: Path
    fingerprint: str
    resume: bool = False
    _full: str = field(default="", init=False)

    def _fingerprint(self, tokens: torch.Tensor | None, names: list[str]) -> str:
        h = hashlib.sha256(f"v{VERSION}\n{self.fingerprint}\n".encode())
        if tokens is not None:
            h.update(str(tuple(tokens.shape)).encode())
            h.update(tokens.detach().cpu().contiguous().numpy().tobytes())
        h.update("\n".join(names).encode())
        return h.hexdigest()

    def begin(self, tokens: torch.Tensor | None, blocks: Sequence[nn.Module], prefix: str,
              methods: list[Any]) -> Resumed | None:
        """Prepare the folder; when resuming, restore ``blocks`` before the saved point and return the state."""
        names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, _ in b.named_parameters()]
        self._full = self._fingerprint(tokens, names)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):  # a kill during a write
            stale.unlink(missing_ok=True)
        meta_path = self.folder / "meta.json"
        if not self.resume or not meta_path.is_file():
            if self.resume:
                log.warning("--resume: no saved state in %s; starting at block 0", self.folder)
            self._clear()
            return None
        try:
            meta = json.loads(meta_path.read_text())
            k = int(meta["next_block"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LowbitError(f"{meta_path} is damaged ({e}); delete {self.folder} and start again") from e
        if meta.get("fingerprint") != self._full:
            raise LowbitError(f"the state saved in {self.folder} belongs to another run (different model, recipe "
                              "or calibration tokens); start without --resume (it is then discarded) or run the "
                              "same command as before")
        if not 0 < k <= len(blocks):
            return None
        weights: dict[str, Any] = {}
        for i in range(k):
            saved = _load(self.folder / f"block-{i:04d}.pt")
            blocks[i].load_state_dict(saved["state"])
            weights.update(saved["weights"])
        acts = _load(self.folder / f"acts-{k - 1:04d}.pt")
        for m, st in zip(methods, acts["methods"], strict=True):
            m.restore(st)
        torch.set_rng_state(acts["rng"])
        log.info("resuming at block %d of %d (state in %s)", k, len(blocks), self.folder)
        return Resumed(k, weights, acts["hidden"], acts["fp_hidden"])

    def save(self, i: int, block: nn.Module, weights: dict[str, Any], hidden: list[torch.Tensor],
             fp_hidden: list[torch.Tensor] | None, methods: list[Any]) -> None:
        """Record that block ``i`` is finished (``weights``: its quantized linears, on the CPU)."""
        state = {k: v.detach().cpu() for k, v in block.state_dict().items()}
        _save({"state": state, "weights": weights}, self.folder / f"block-{i:04d}.pt")
        _save({"hidden": [h.cpu() for h in hidden], "fp_hidden": None if fp_hidden is None else
               [h.cpu() for h in fp_hidden], "methods": [m.state() for m in methods], "rng": torch.get_rng_state()},
              self.folder / f"acts-{i:04d}.pt")
        write_json_atomic(self.folder / "meta.json", {"version": VERSION, "fingerprint": self._full,
                                                      "next_block": i + 1})
        fsync_dir(self.folder)
        (self.folder / f"acts-{i - 1:04d}.pt").unlink(missing_ok=True)

    def _clear(self) -> None:
        for f in self.folder.iterdir():
            if f.is_file():
                f.unlink()

    def remove(self) -> None:
        """Delete the saved state (the run's artifact is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
