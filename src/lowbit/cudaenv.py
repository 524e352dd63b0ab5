"""Process settings for torch's CUDA allocators, applied before torch loads (the CLI and the bench
scripts call :func:`tune_pinned_allocator` first thing; API users may too, before importing torch).

Pinned host memory: the block engine keeps calibration activations and every result (about one
byte per weight) in pinned memory. torch allocates it with ``cudaHostAlloc`` by default, which
holds a driver lock while it pins the pages, so the main thread's kernel launches wait behind it.
``pinned_use_cuda_host_register`` makes torch ``malloc`` the memory, touch it from
``pinned_num_register_threads`` threads and register it with ``cudaHostRegister`` instead. Measured
on an H200 host (GPTQ of a Llama-3-8B-shaped model, 128 x 2048 tokens, offloaded activations):
plain GPTQ 51.96 s -> 43.54 s, GPTAQ (skip-last) 70.80 s -> 57.42 s (``bench/gptq_speed.py``).
"""

from __future__ import annotations

import os

PINNED = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def tune_pinned_allocator(environ: dict[str, str] | None = None) -> str | None:
    """Add :data:`PINNED` to torch's allocator settings unless the user chose pinned settings.

    torch reads ``PYTORCH_ALLOC_CONF`` (or the older ``PYTORCH_CUDA_ALLOC_CONF``) once, when it
    first sets up CUDA: call this before that. Appends to whichever variable is set (the newer
    name when neither is), keeps the user's other settings, and returns the variable it changed
    (None when the user already set ``pinned_*`` options).
    """
    env = os.environ if environ is None else environ
    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    if any("pinned_" in env.get(n, "") for n in names):
        return None
    var = next((n for n in names if env.get(n)), "PYTORCH_CUDA_ALLOC_CONF")
    cur = env.get(var, "")
    env[var] = f"{cur},{PINNED}" if cur else PINNED
    return var
