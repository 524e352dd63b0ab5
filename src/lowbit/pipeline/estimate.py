"""Before a calibrated run: estimate peak device and CPU memory and the time, and refuse a run
whose single block cannot fit on the device.

Peak device memory of the block-by-block engine::

    block weights (compute dtype)
  + calibration activations, inputs and outputs of one block:   2 n T d  x bytes
    (GPTQ: and the attention's saved outputs before o_proj, n T d_attn x bytes, for its replay)
  + the working set of one forward of one sample:               T (3 I + 4 d) x 4 + heads T^2 x 4
  + statistics: GPTQ Hessians of one stage (all stages without true-sequential), in^2 x 4 each
                (on the CPU with ``hessians_on_cpu``); imatrix vectors are negligible
  + asymmetric calibration (GPTAQ): the float model's activations too (2 n T d x bytes more), float
    copies of the linears quantized before the last paired stage, and D beside the Hessian of each
    group aimed at the float output (in^2 x 4 each)

Time: every block runs ``r`` forwards over ``n T`` tokens (imatrix 1, GPTQ one per stage + 1, GPTAQ
one more per paired stage),
``2 P_block n T + 4 n T^2 d`` FLOPs each, plus GPTQ's solves (``in^3`` for the inverse Cholesky
and ``2 out in^2`` for the column updates per linear), over a measured matmul rate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.models.archs import ArchSpec, block_linears, get_blocks
from lowbit.pipeline.awq import AWQMethod
from lowbit.pipeline.blockwise import BlockMethod
from lowbit.pipeline.gptq import GPTQMethod, Stage

log = logging.getLogger(__name__)
GiB = 2**30


@dataclass
class RunEstimate:
    device: str
    device_bytes: int
    cpu_bytes: int
    seconds: float
    parts: dict[str, float]

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in self.parts.items())
        return (f"estimate: peak {self.device_bytes / GiB:.2f} GiB on {self.device} ({parts}), "
                f"{self.cpu_bytes / GiB:.2f} GiB CPU memory, about {self.seconds:.0f} s")


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """Measured FLOP/s of an ``n x n`` matmul on ``device`` (a few repetitions, median-free but warm)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        a @ a
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def compute_rate(device: torch.device, dtype: torch.dtype) -> float:
    """:func:`matmul_rate` in the precision a calibration run computes in: the model's ``dtype`` on a
    GPU, float32 on the CPU."""
    return matmul_rate(device, dtype if device.type == "cuda" else torch.float32)


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def estimate_run(model: nn.Module, spec: ArchSpec, method: BlockMethod, n_samples: int, seq_len: int,
                 device: torch.device, rate: float | None = None, offload: bool = False) -> RunEstimate:
    blocks = get_blocks(model, spec)
    block = blocks[0]
    cfg = getattr(model, "config", None)
    d = int(getattr(cfg, "hidden_size", 0))
    inter = int(getattr(cfg, "intermediate_size", 0) or 4 * d)
    heads = int(getattr(cfg, "num_attention_heads", 1))
    dtype = next(block.parameters()).dtype
    elt = torch.finfo(dtype).bits // 8
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    block_params = sum(p.numel() for p in block.parameters())
    tokens = n_samples * seq_len
    acts = 2 * tokens * d * elt if method.needs_calibration else 0
    device_acts = 2 * seq_len * d * elt if offload and method.needs_calibration else acts
    work = (seq_len * (3 * inter + 4 * d) * 4 + heads * seq_len**2 * 4) if method.needs_calibration else 0
    linears = block_linears(block, spec)
    hess = 0
    runs = 1 if method.needs_calibration else 0
    float_copy = 0  # GPTAQ's float copies of the linears quantized before its last paired stage
    # GPTQ itself, or GPTQ inside another method (awq+gptq: AWQ's scales, then GPTQ on the block)
    gq = method if isinstance(method, GPTQMethod) else getattr(method, "inner", None)
    if isinstance(gq, GPTQMethod):
        stages, copies = gq.plan(spec)

        def stats(st: Stage) -> int:  # H of each group of the stage, and D beside it where aimed at the float
            return sum(linears[g[0]].in_features ** 2 * 4 * (2 if g[0] in st.asym else 1) for g in st.groups)

        hess = max(stats(st) for st in stages)
        paired = sum(1 for st in stages if st.asym)
        runs = len(stages) + paired + 1
        proj = spec.attn_out[1] if spec.attn_out is not None and gq.replay_attention else None
        if proj is not None and any(proj in st.groups[0] for st in stages):  # its saved inputs (for the replay)
            z = linears[proj].in_features
            acts += tokens * z * elt
            device_acts += (seq_len if offload else tokens) * z * elt
        if gq.float_inputs:  # the float block runs beside the quantized one, with copies of what changed
            acts, device_acts = 2 * acts, 2 * device_acts
            float_copy = sum(linears[n].weight.numel() * linears[n].weight.element_size() for n in copies)
    device_hess = 0 if isinstance(gq, GPTQMethod) and gq.hessians_on_cpu else hess
    parts = {"block": float(block_bytes), "activations": float(device_acts), "workspace": float(work),
             "hessians": float(device_hess)}
    if float_copy:
        parts["float weights"] = float(float_copy)
    host_sample, search_flops = 0, 0
    if isinstance(method, AWQMethod) and method.preset is None and method.needs_calibration:
        # the scale search keeps its parents' inputs (attention calls, MLP and down_proj rows) and their
        # float32 reference outputs on the device, and each group's input sample (float32) on the host
        st = min(tokens, method.max_tokens)
        parts["AWQ search"] = float(st * (2 * d + inter) * elt + st * d * 4)
        host_sample = st * sum(linears[g.linears[0]].in_features for g in spec.groups) * 4
        # every candidate runs each group's parent on the sample (together about one block): the identity, the
        # alpha grid (both grids share alpha 0's identity under "both"), and the reference run
        points = (2 * method.grid - 1 if method.duo_scaling == "both" else method.grid) + 2
        search_flops = len(blocks) * points * (2 * block_params * st + 4 * st * seq_len * d)
    device_bytes = int(sum(parts.values()))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cpu_bytes = (model_bytes + (acts if device.type == "cpu" or offload else 0) + (hess - device_hess)
                 + host_sample)
    rate = rate or compute_rate(device, dtype)
    flops = len(blocks) * runs * (2 * block_params * tokens + 4 * n_samples * seq_len**2 * d) + search_flops
    if isinstance(gq, GPTQMethod):
        flops += len(blocks) * sum(m.in_features**3 + 2 * m.out_features * m.in_features**2
                                   for m in linears.values())
    return RunEstimate(str(device), device_bytes, int(cpu_bytes), flops / rate, parts)


def check_fits(est: RunEstimate, device: torch.device, free: int | None = None) -> None:
    """Refuse a run whose peak exceeds the free memory of ``device``, saying what would help."""
    free = available_bytes(device) if free is None else free
    if est.device_bytes > free:
        raise LowbitError(
            f"{est.device} cannot hold one block of this run: it needs about {est.device_bytes / GiB:.2f} GiB "
            f"({', '.join(f'{k} {v / GiB:.2f}' for k, v in est.parts.items())} GiB) and {free / GiB:.2f} GiB "
            "are free. Pass --offload-activations or --hessians-on-cpu, lower --calib-samples or --calib-len, "
            "or use a larger device."
        )
