"""Data-parallel GPTQ on several GPUs (torchrun, NCCL): same artifact as one GPU, and the speed-up.

    python bench/gptq_multi_gpu.py --layers 4 --save /tmp/one.safetensors                 # one GPU
    torchrun --nproc-per-node 2 bench/gptq_multi_gpu.py --layers 4 --save /tmp/two.safetensors
    python bench/gptq_multi_gpu.py --compare /tmp/one.safetensors /tmp/two.safetensors --out $OUT/multi.json

A Llama-3-8B-shaped model (random bf16 weights, ``--layers`` decoder layers) and 128 x 2048 random
tokens; GPTQ W4A16 g128 (act-order, static groups, true-sequential) through lowbit's block
pipeline, on ``cuda:LOCAL_RANK``. Under torchrun each rank takes a share of the samples, Hessians
are summed with all-reduce and the solves of a block are spread over the ranks. Each run writes
the codes and scales (rank 0) plus its wall time; ``--compare`` reports code agreement, the
largest dequantized difference and the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gptq_speed import build_model, llama3_8b_config, random_tokens  # noqa: E402
from lowbit.core.scheme import get_scheme  # noqa: E402
from lowbit.methods.gptq import GPTQConfig  # noqa: E402
from lowbit.pipeline.distributed import init_from_env, shard, world  # noqa: E402
from lowbit.pipeline.gptq import GPTQMethod  # noqa: E402
from lowbit.pipeline.quantize import quantize_model  # noqa: E402


def run(a: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    init_from_env()
    rank, size = world()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(dev)
    cfg = llama3_8b_config(a.layers, tiny=False)
    model = build_model(cfg, dev)
    tokens = shard(random_tokens(a.samples, a.seq, cfg.vocab_size))
    scheme = get_scheme("W4A16")
    method = GPTQMethod(scheme, GPTQConfig(act_order=True, static_groups=True), true_sequential=True)
    torch.cuda.synchronize(dev)
    if size > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    qws = quantize_model(model, scheme, method, tokens=tokens, device=str(dev), progress=False,
                         offload_activations=a.offload)
    torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    peaks = [torch.cuda.max_memory_allocated(dev)]
    if size > 1:  # every rank's peak: the ranks that solve the larger groups hold more
        gathered: list[object] = [None] * size
        torch.distributed.all_gather_object(gathered, peaks[0])
        peaks = [int(str(p)) for p in gathered]
    peak = max(peaks)
    if rank == 0:
        t = {f"{n}.codes": q.codes.contiguous() for n, q in qws.items()}
        t.update({f"{n}.scales": q.scales.float().contiguous() for n, q in qws.items()})
        save_file(t, a.save, metadata={"seconds": str(seconds), "world_size": str(size), "peak": str(peak),
                                       "peak_per_rank": json.dumps(peaks), "samples_per_rank": str(tokens.shape[0])})
        print(json.dumps({"world_size": size, "seconds": seconds, "peak_gib": peak / 2**30,
                          "peak_gib_per_rank": [p / 2**30 for p in peaks], "samples_per_rank": tokens.shape[0],
                          "host_threads": torch.get_num_threads()}))
    if size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def compare(a: argparse.Namespace) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    one, two = (load_file(p) for p in a.compare)
    metas = []
    for p in a.compare:
        with safe_open(p, "pt") as f:
            metas.append(f.metadata())
    same = total = 0
    worst = 0.0
    for k, v in one.items():
        if k.endswith(".codes"):
            same += int((v == two[k]).sum())
            total += v.numel()
        else:
            worst = max(worst, float(((v - two[k]).abs() / v.abs().clamp(min=1e-12)).max()))
    rep: dict[str, Any] = {"code_agreement": same / max(total, 1), "codes": total, "max_rel_scale_diff": worst,
           "runs": [{**{k: float(m[k]) for k in ("seconds", "world_size", "peak", "samples_per_rank")},
                     "peak_per_rank": json.loads(m.get("peak_per_rank", "[]"))} for m in metas]}
    rep["speedup"] = rep["runs"][0]["seconds"] / rep["runs"][1]["seconds"]
    print(json.dumps(rep, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(rep, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--offload", action="store_true", help="calibration activations in pinned CPU memory")
    p.add_argument("--save", default="/tmp/gptq_run.safetensors")
    p.add_argument("--compare", nargs=2, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    compare(a) if a.compare else run(a)


if __name__ == "__main__":
    main()
