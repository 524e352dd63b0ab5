"""Engine settings: how a run goes (device, memory placement, progress, threads), never what it produces.

A :class:`~lowbit.recipe.Recipe` says *what* a quantization is; an :class:`Engine` says where and how
it runs. Two runs of one recipe on different engines write the same artifact, up to the float
rounding differences between devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.errors import LowbitError


@dataclass(frozen=True)
class Engine:
    """Where and how a quantization runs.

    Attributes:
        device: ``auto`` (the current GPU if any, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; the
            weights stay in host memory and visit the device block by block.
        offload_activations: keep the calibration activations in host memory (device: about one block).
        hessians_on_cpu: keep GPTQ's Hessians in host memory.
        progress: progress bars on a terminal, periodic plain lines otherwise; False for none.
        threads: CPU threads for torch (None: torch's default).
        save_search: also write a searching method's result (AWQ's scales and clips) to this file.
        checkpoint: save each finished block of a calibrated run next to the output folder
            (:mod:`lowbit.pipeline.checkpoint`), removed once the artifact is written.
        resume: continue a killed run from its saved blocks (implies ``checkpoint``).
    """

    device: str = "auto"
    offload_activations: bool = False
    hessians_on_cpu: bool = False
    progress: bool = True
    threads: int | None = None
    save_search: str | None = None
    checkpoint: bool = False
    resume: bool = False

    def resolved_device(self) -> str:
        """The device this engine runs on; an unavailable one is an error saying what is there."""
        return resolve_device(self.device)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda:N`` (current GPU) or ``cpu``; check that a named device exists."""
    if name == "auto":
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise LowbitError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LowbitError(f"--device {name}: this machine has no CUDA GPU visible to torch "
                              f"(torch {torch.__version__}); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise LowbitError(f"--device {name}: only {n} CUDA device(s) here (cuda:0..cuda:{n - 1})")
        return str(dev)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LowbitError("--device mps: MPS is not available here; use --device cpu")
    return str(dev)
