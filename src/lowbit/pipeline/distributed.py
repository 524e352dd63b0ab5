"""Data-parallel calibration over ``torch.distributed`` (``torchrun``; NCCL on GPUs, gloo on CPUs).

Each rank runs its share of the calibration samples through every block; statistics are summed
across ranks before any solve (a Hessian is a token-weighted mean, so ranks reduce
``H * n`` and ``n``); the solves of a block are spread over ranks round-robin and their results
broadcast, so every rank holds the same quantized block before it computes its next inputs.
Without an initialised process group every helper is the identity (one process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm(device: torch.device) -> torch.device:
    """NCCL moves only CUDA tensors: collectives of CPU-held statistics go through this rank's GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment (NCCL with GPUs, else gloo)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shard(tokens: torch.Tensor) -> torch.Tensor:
    """This rank's calibration samples: rows ``rank, rank + world, ...`` of ``tokens (n, T)``."""
    rank, size = world()
    return tokens[rank::size] if size > 1 else tokens


def sum_weighted(mean: torch.Tensor, n: int, inplace: bool = False) -> tuple[torch.Tensor, int]:
    """Combine per-rank means of ``n`` tokens each into the global mean (and the global count).

    With ``inplace`` the result is written into ``mean`` itself where the collective can reach it
    (on the communication device): no temporaries the size of ``mean`` (a 14336-wide Hessian is
    0.77 GiB; the out-of-place sum made two more on every rank)."""
    if world()[1] == 1:
        return mean, n
    dev = _comm(mean.device)
    total = torch.tensor([float(n)], dtype=torch.float64, device=dev)
    dist.all_reduce(total)
    if inplace and mean.device == dev:
        dist.all_reduce(mean.mul_(n))
        return mean.div_(float(total)), int(total)
    acc = mean.to(dev) * n
    dist.all_reduce(acc)
    return (acc / float(total)).to(mean.device), int(total)


def broadcast_qweight(qw: QuantizedWeight | None, src: int, shape: tuple[int, int], scheme: QuantScheme,
                      scale_dtype: torch.dtype, device: torch.device, act_order_groups: bool) -> QuantizedWeight:
    """The ``QuantizedWeight`` solved on rank ``src``, on every rank."""
    if world()[1] == 1:
        assert qw is not None
        return qw
    out, inp = shape
    groups = scheme.n_groups(inp)
    device = _comm(device)
    if qw is None:
        codes = torch.empty(out, inp, dtype=torch.uint8, device=device)
        scales = torch.empty(out, groups, dtype=torch.float32, device=device)
        zeros = torch.empty(out, groups, dtype=torch.uint8, device=device)
        g_idx = torch.empty(inp, dtype=torch.int32, device=device) if act_order_groups else None
    else:
        codes, zeros = qw.codes.to(device).contiguous(), qw.zeros.to(device).contiguous()
        scales = qw.scales.to(device=device, dtype=torch.float32).contiguous()
        g_idx = None if qw.g_idx is None else qw.g_idx.to(device=device, dtype=torch.int32).contiguous()
    for t in (codes, scales, zeros, g_idx):
        if t is not None:
            dist.broadcast(t, src)
    return QuantizedWeight(codes, scales.to(scale_dtype), zeros, scheme, g_idx)


def broadcast_object(obj: object, src: int) -> object:
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]
