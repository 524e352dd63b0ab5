"""The fused RMSNorm of the calibration forwards: the eager arithmetic (to two ulp), applied
and removed per block without touching the module tree."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.pipeline import fused_norm
from lowbit.pipeline.fused_norm import fused_norms

CHECK = r"""
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from lowbit.pipeline.fused_norm import rms_norm

dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
cases = [(4096, 64, torch.float16), (576, 40, torch.float16)]
if dev == "cuda":  # Triton's CPU interpreter casts to bf16 by truncation (numpy has no bf16): GPU only
    cases += [(4096, 64, torch.bfloat16), (896, 96, torch.bfloat16)]
for d, rows, dtype in cases:
    norm = LlamaRMSNorm(d, eps=1e-6).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    x = (3 * torch.randn(2, rows, d, generator=g)).to(dtype)
    x[0, 0] = 0  # an all-zero row: eps alone under the root
    ref = norm.to(dev)(x.to(dev)).cpu()
    got = rms_norm(x.to(dev), norm.weight, norm.variance_epsilon).cpu()
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.isfinite(got.float()).all()
    ulp = (ref.view(torch.int16).int() - got.view(torch.int16).int()).abs()
    # y = x * r may round one ulp apart; the weight product can turn that into two of the output's
    assert int(ulp.max()) <= 2, (d, int(ulp.max()))
    assert float((ulp == 0).float().mean()) >= 0.999, (d, float((ulp == 0).float().mean()))
    gnorm = Gemma3RMSNorm(d, eps=1e-6).to(dtype)
    gnorm.weight.data = (0.1 * torch.randn(d, generator=g)).to(dtype)
    gref = gnorm.to(dev)(x.to(dev)).cpu()
    ggot = rms_norm(x.to(dev), gnorm.weight, gnorm.eps, gemma=True).cpu()
    gulp = (gref.view(torch.int16).int() - ggot.view(torch.int16).int()).abs()
    assert int(gulp.max()) <= 1 and float((gulp == 0).float().mean()) >= 0.999, (d, int(gulp.max()))
    xs = x.transpose(0, 1)  # a strided input: the kernel reads a contiguous copy
    assert torch.equal(rms_norm(xs.to(dev), norm.weight, norm.variance_epsilon).cpu(),
                       rms_norm(xs.contiguous().to(dev), norm.weight, norm.variance_epsilon).cpu())
print("OK")
"""


@pytest.mark.kernel
def test_kernel_is_the_eager_arithmetic_to_two_ulp():
    pytest.importorskip("triton", reason="needs the triton package (in the dev extra on x86-64 Linux)")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the kernel, interpreted on the CPU
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("OK"), r.stdout


@pytest.mark.parametrize("arch, expect", [("llama", 2), ("qwen2", 2), ("gemma3", 6), ("qwen3", 4), ("phi3", 2)])
def test_fused_norms_attach_per_block_and_leave_no_trace(tmp_path, monkeypatch, arch, expect):
    """Forced on here: the known norm classes get the override (Gemma 3: four around the sublayers,
    q_norm and k_norm; Qwen3: two and q_norm / k_norm, which normalise each head of
    ``(1, T, heads, head_dim)``), hooks still fire, CPU float32 inputs take the eager fallback (the kernel
    is never called, so the outputs are the eager ones bit for bit), and nothing remains on the modules
    afterwards. The kernel inside a model's forward is checked on a GPU
    (test_fused_norms_in_a_half_precision_forward)."""
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path, arch), dtype=torch.float32).eval()
    block = model.model.layers[0]
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    assert fused_norm.usable(torch.device("cpu")) is False
    with fused_norms(block, torch.device("cpu")) as k:
        assert k == 0  # not on a CPU
    monkeypatch.setattr(fused_norm, "usable", lambda device: True)

    def no_kernel(*a, **k):  # float32 CPU inputs must take the eager fallback, never the kernel
        raise AssertionError("the fused kernel ran on a CPU float32 input")

    monkeypatch.setattr(fused_norm, "rms_norm", no_kernel)
    seen = []
    h = block.input_layernorm.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with fused_norms(block, torch.device("cpu")) as k, torch.no_grad():
        assert k == expect
        assert all("forward" in m.__dict__ for m in block.modules() if type(m).__name__ in fused_norm.NORM_STYLES)
        got = model(ids).logits
    h.remove()
    assert seen and torch.equal(got, ref)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError), fused_norms(block, torch.device("cpu")):
        raise RuntimeError("a failing block")
    assert not any("forward" in m.__dict__ for m in model.modules())  # removed on the error path too


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_norms_in_a_half_precision_forward(tmp_path, arch):
    """On CUDA in bf16 the override runs the kernel inside the model's forward (every norm called, the
    kernel reached) and the logits stay those of the eager norms: each norm output is within two bf16
    ulps of eager (test_kernel_is_the_eager_arithmetic_to_two_ulp), i.e. 2^-7 relative, and a bf16
    forward already rounds every activation by 2^-8, so the logits differ by a few bf16 roundings."""
    calls = []
    real = fused_norm.rms_norm

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path, arch), dtype=torch.bfloat16)
    model = model.cuda().eval()
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref = model(ids).logits.float()
    blocks = list(model.model.layers)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_norm, "rms_norm", spy)
        from contextlib import ExitStack

        with ExitStack() as stack:
            n = sum(stack.enter_context(fused_norms(b, torch.device("cuda"))) for b in blocks)
            got = model(ids).logits.float()
    assert n > 0 and len(calls) == n
    assert (got - ref).abs().max() <= 2**-5 * ref.abs().max(), ((got - ref).abs().max(), ref.abs().max())
