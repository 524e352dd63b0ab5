import sys, time
sys.path.insert(0, "src")
from lowbit.cudaenv import tune_pinned_allocator
tune_pinned_allocator()
import torch
torch.zeros(1, device="cuda")
def alloc(n):
    t = time.perf_counter(); xs = [torch.empty(2048 * 4096, dtype=torch.bfloat16, pin_memory=True) for _ in range(n)]
    return xs, time.perf_counter() - t
xs, dt = alloc(128); print(f"first 2 GiB pinned (128 x 16 MiB): {dt:.3f} s", flush=True)
ys, dt = alloc(384); print(f"next 6 GiB pinned: {dt:.3f} s", flush=True)
del xs, ys
zs, dt = alloc(512); print(f"8 GiB again from the cache: {dt:.3f} s", flush=True)
del zs
d = torch.randn(2048 * 4096, device="cuda", dtype=torch.bfloat16)
t = time.perf_counter()
for _ in range(128):
    h = torch.empty(d.shape, dtype=d.dtype, pin_memory=True).copy_(d, non_blocking=True)
torch.cuda.synchronize(); print(f"128 D2H of 16 MiB into cached pinned: {time.perf_counter() - t:.3f} s", flush=True)
