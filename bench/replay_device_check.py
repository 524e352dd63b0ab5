"""On a GPU, GPTQ's codes do not depend on where the activations live or on the attention replay.

    PYTHONPATH=src python bench/replay_device_check.py

A small random bf16 Llama (4 layers, 1024 wide, grouped-query attention) is quantized by the default
GPTQ (GPTAQ 0.5, skip-last) four times: activations on the device or offloaded to pinned host
memory (the copy-out stream, the background pinning, the side-stream uploads), each with and
without the attention replay. Every run must give the same codes and scales, bit for bit: the
kernels and their inputs are the same, so any difference is an ordering bug in the transfers.
(Written 2026-11-29; not yet run on a GPU when it was committed: the session's device time was spent.)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lowbit.cudaenv import tune_pinned_allocator

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    tune_pinned_allocator()  # before torch sets up CUDA, as the CLI does
    import torch
    from transformers import LlamaConfig

    from gptq_speed import build_model
    from lowbit.core.scheme import QuantScheme
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.pipeline.blockwise import run_blockwise
    from lowbit.pipeline.gptq import GPTQMethod

    dev = torch.device("cuda")
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=2,
                      num_hidden_layers=4, vocab_size=32000, max_position_embeddings=4096)
    toks = torch.randint(0, 32000, (24, 512), generator=torch.Generator().manual_seed(0))
    res: dict = {}
    for off in (False, True):
        for rp in (False, True):
            m = build_model(cfg, dev)
            t = time.perf_counter()
            res[off, rp] = run_blockwise(m, GPTQMethod(QuantScheme(4, 128, True), GPTQConfig(), replay_attention=rp),
                                         toks, device=dev, progress=False, offload_activations=off)
            print(f"offload={off} replay={rp}: {time.perf_counter() - t:.2f} s", flush=True)
    base = res[False, False]
    for k, r in res.items():
        same = all(torch.equal(r[n].codes, base[n].codes) and torch.equal(r[n].scales, base[n].scales) for n in base)
        diff = sum(int((r[n].codes != base[n].codes).sum()) for n in base)
        print(f"offload={k[0]} replay={k[1]}: identical to offload=False replay=False: {same} "
              f"({diff} codes differ)", flush=True)
        assert same, f"offload/replay {k} changed the codes: a transfer ordering bug"


if __name__ == "__main__":
    main()
