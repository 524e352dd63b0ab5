"""Where a cold process's first GPTQ block spends its warm-up (one H200): each first call timed."""
import sys, time, torch
import torch.nn.functional as F
t = [time.perf_counter()]
def lap(msg):
    torch.cuda.synchronize(); n = time.perf_counter(); print(f"{msg:55s} {n - t[0]:7.3f} s", flush=True); t[0] = n
torch.zeros(1, device="cuda"); lap("cuda init")
from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptq import GPTQConfig, gptq_quantize
lap("import lowbit")
dev = "cuda"
X = torch.randn(8192, 512, device=dev); H = X.T @ X / 8192; W = torch.randn(256, 512, device=dev)
lap("setup (fp32 mm)")
xb = torch.randn(2048, 4096, device=dev, dtype=torch.bfloat16); S = torch.zeros(4096, 4096, device=dev)
torch.addmm(S, xb.T, xb, out_dtype=torch.float32, out=S); lap("addmm out_dtype fp32 first")
torch.addmm(S, xb.T, xb, out_dtype=torch.float32, out=S); lap("addmm out_dtype fp32 second")
torch.linalg.cholesky_ex(H); lap("cholesky first")
torch.linalg.cholesky_ex(H); lap("cholesky second")
for k in range(2):
    gptq_quantize(W.clone(), H.clone(), QuantScheme(4, 128, True), GPTQConfig(asym_alpha=0.0), scale_dtype=torch.bfloat16); lap(f"gptq plain #{k}")
for k in range(2):
    gptq_quantize(W.clone(), H.clone(), QuantScheme(4, 128, True), GPTQConfig(), scale_dtype=torch.bfloat16, wd=torch.randn_like(W) * 0.01); lap(f"gptq gptaq (wd) #{k}")
W2 = torch.randn(1024, 4096, device=dev); X2 = torch.randn(8192, 4096, device=dev); H2 = X2.T @ X2 / 8192; lap("setup 4096")
for k in range(2):
    gptq_quantize(W2.clone(), H2.clone(), QuantScheme(4, 128, True), GPTQConfig(), scale_dtype=torch.bfloat16, wd=torch.randn_like(W2) * 0.01); lap(f"gptq gptaq 1024x4096 #{k}")
q = torch.randn(1, 32, 2048, 128, device=dev, dtype=torch.bfloat16); k_ = torch.randn(1, 8, 2048, 128, device=dev, dtype=torch.bfloat16)
for k in range(2):
    F.scaled_dot_product_attention(q, k_, k_, is_causal=True, enable_gqa=True); lap(f"sdpa #{k}")
