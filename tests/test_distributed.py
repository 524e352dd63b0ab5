"""Data-parallel GPTQ: a 2-process gloo run (torchrun on CPU) gives the same artifact as one process."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model_dir
from lowbit.formats.compressed_tensors import load_quantized

TEXT = "\n\n".join(f"paragraph {i}: low bit models keep their answers when the quantizer is careful" * 3
                   for i in range(60))


@pytest.mark.parametrize("method", ["gptq", "imatrix-rtn"])
def test_two_ranks_match_one(tmp_path, method):
    d = make_tiny_model_dir(tmp_path / "m", "llama")
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    args = ["quantize", str(d), "--scheme", "W4A16", "--group-size", "32", "--method", method, "--calib",
            str(corpus), "--calib-samples", "8", "--calib-len", "32", "--device", "cpu", "--seed", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    env_cmd = [sys.executable, "-m", "lowbit.cli", "--no-progress"]
    subprocess.run([*env_cmd, *args, "-o", str(one)], check=True, timeout=300)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", "-m", "lowbit.cli", "--no-progress", *args, "-o", str(two)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((two / "provenance.json").read_text())["world_size"] == 2
    assert "world_size" not in json.loads((one / "provenance.json").read_text())
    a, _ = load_quantized(one)
    b, _ = load_quantized(two)
    n_codes = n_same = 0
    for name, mod in a.named_modules():
        if hasattr(mod, "qweight"):
            qa, qb = mod.qweight(), b.get_submodule(name).qweight()
            n_codes += qa.codes.numel()
            n_same += int((qa.codes == qb.codes).sum())
            # a flip is a near tie rounding the other way: one step, never more
            assert int((qa.codes.int() - qb.codes.int()).abs().max()) <= 1, name
            # scales: from the same weights (plus, with GPTAQ, a shift through the factor of an H whose
            # sums differ in the last bits): equal up to a few float32 ulps, then the artifact's rounding
            rel = ((qa.scales.float() - qb.scales.float()).abs() / qa.scales.float()).max()
            assert rel <= torch.finfo(qa.scales.dtype).eps, (name, rel)  # at most one ulp of the stored dtype
    # Hessians summed in another order differ in the last bits: a few codes may round the other way
    flipped = 1 - n_same / n_codes
    assert flipped < 1e-3, flipped
    # Logits: a flipped code moves its weight by one step s, a rounding error is uniform in +-s/2 (RMS
    # s / sqrt(12)); so the flips perturb the weights by sqrt(12 * flipped) of the quantization error's norm,
    # and, to first order, the logits by that fraction of the quantization's logit error (x2 margin)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        la, lb = a(ids).logits, b(ids).logits
        lf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits
    bound = 2 * (12 * flipped) ** 0.5 * float((la - lf).norm()) + 1e-5 * float(la.norm())
    assert float((la - lb).norm()) <= bound, (float((la - lb).norm()), bound, flipped)


REDUCE = """
import torch, torch.distributed as dist
from lowbit.pipeline.distributed import init_from_env, sum_weighted
init_from_env()
r = dist.get_rank()
n = r + 1                                   # rank 0: 1 token of mean 1, rank 1: 2 tokens of mean 2
a, b = torch.full((3, 3), float(r + 1)), torch.full((3, 3), float(r + 1))
ptr = a.data_ptr()
ma, na = sum_weighted(a, n, inplace=True)
mb, nb = sum_weighted(b, n)
assert ma.data_ptr() == ptr and torch.equal(a, ma), "in place: the result is the input's own buffer"
assert b.data_ptr() != mb.data_ptr() and torch.equal(b, torch.full((3, 3), float(r + 1))), "out of place"
assert na == nb == 3 and torch.allclose(ma, torch.full((3, 3), 5 / 3)) and torch.equal(ma, mb), (ma, mb)
dist.destroy_process_group()
"""


def test_sum_weighted_in_place_matches_out_of_place(tmp_path):
    """Two gloo ranks: the in-place token-weighted mean is written into the input's buffer and equals
    the out-of-place one ((1 * 1 + 2 * 2) / 3)."""
    script = tmp_path / "reduce.py"
    script.write_text(REDUCE)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


RETRY = """
import sys, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
import lowbit.pipeline.gptq as pg
from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptq import GPTQConfig, HessianConsumed
from lowbit.pipeline.distributed import init_from_env, shard
from lowbit.pipeline.quantize import quantize_model

init_from_env()
r = dist.get_rank()
ids = shard(torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(2)))
real, calls = pg.gptq_quantize, []

def flaky(W, H, *a, consume_hessian=False, **k):
    calls.append(consume_hessian)
    if len(calls) == 1 and r == 0:
        assert consume_hessian, "the owner factorises the summed H in place"
        H.fill_(float("nan"))  # what a failed in-place factorisation leaves behind
        W.fill_(float("nan"))
        raise HessianConsumed("failed")
    return real(W, H, *a, consume_hessian=consume_hessian, **k)

results = []
for patch in (False, True):
    pg.gptq_quantize = flaky if patch else real
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    scheme = QuantScheme(4, 32)
    method = pg.GPTQMethod(scheme, GPTQConfig(asym_alpha=0.5, asym_scope="all"), scale_dtype=torch.float32)
    results.append(quantize_model(model, scheme, method, tokens=ids, progress=False))
if r == 0:
    assert calls[:3] == [True, False, True], calls  # failed, retried from the host copy, next group consumed
else:
    assert all(calls), calls  # every solve of this rank consumed its H (no device copy)
clean, retried = results
assert clean.keys() == retried.keys() and len(clean) == 14
for n in clean:  # the failure was planted: the retry from the backup solves the same H at the same damp
    assert torch.equal(clean[n].codes, retried[n].codes), n
    assert torch.equal(clean[n].scales, retried[n].scales), n
dist.destroy_process_group()
"""


def test_owner_retries_from_its_host_copy_of_the_summed_hessian(tmp_path):
    """Under two ranks the solving rank factorises the summed H in place; when that fails, one rank
    cannot run the block again alone, so the retry starts from the host copy taken before, and gives
    the artifact of a run without the failure."""
    d = make_tiny_model_dir(tmp_path / "m", "llama")
    script = tmp_path / "retry.py"
    script.write_text(RETRY)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", str(script), str(d)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

