"""Would feeding the calibration engine two or four samples per forward pay? A Llama-3-8B decoder
layer's eager forward (bf16, random weights, SDPA) at batch 1, 2 and 4, in ms per 2048-token sample.

Measured on an H200 (torch 2.11, 2026-11-30, ``bench/results/batch_forward_h200.json``): 1.768 ms
at batch 1, 1.724 at batch 2, 1.716 at batch 4: 2.5% at most. The whole-block forward is bound by
the GPU's own work, not by launches, so batching samples is not a lever for GPTQ's speed.

    python bench/batch_forward.py   # on a CUDA machine; writes batch_forward.json under $OUT or .
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_speed import llama3_8b_config  # noqa: E402

cfg = llama3_8b_config(1, tiny=False)
cfg._attn_implementation = "sdpa"
dev = torch.device("cuda")
layer = LlamaDecoderLayer(cfg, 0).to(dev, torch.bfloat16).eval()
rope = LlamaRotaryEmbedding(cfg).to(dev)
T = 2048
out: dict[int, float] = {}
with torch.no_grad():
    for B in (1, 2, 4):
        x = torch.randn(B, T, 4096, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(T, device=dev)[None].expand(B, T)
        pe = rope(x, pos)
        for _ in range(3):
            layer(x, position_embeddings=pe, attention_mask=None, position_ids=pos)
        torch.cuda.synchronize()
        n = 64 // B
        t0 = time.perf_counter()
        for _ in range(n):
            layer(x, position_embeddings=pe, attention_mask=None, position_ids=pos)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / (n * B) * 1e3
        out[B] = ms
        print(f"batch {B}: {ms:.3f} ms a sample", flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "batch_forward.json"), "w"))
