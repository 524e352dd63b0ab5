"""Asymmetric calibration (GPTAQ): the corrected target, its statistics, and the pipeline."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.core.errors import SchemeError
from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptaq import asymmetric_target_, cross_product, shift_with_factor_
from lowbit.methods.gptq import GPTQConfig, _inverse_cholesky_, gptq_quantize
from lowbit.pipeline.gptq import GPTQMethod
from lowbit.pipeline.hessian import HessianObserver
from lowbit.pipeline.quantize import quantize_model


def _pair(n=2048, inp=64, out=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, inp, generator=g) * torch.rand(inp, generator=g).mul(3).add(0.2)
    Xq = X + 0.3 * torch.randn(n, inp, generator=g)  # the quantized model's inputs drift from the float ones
    W = torch.randn(out, inp, generator=g) / inp**0.5
    H = 2 / n * Xq.T @ Xq
    D = 2 / n * (X - Xq).T @ Xq
    return X, Xq, W, H, D


def test_full_strength_target_is_the_least_squares_fit_of_the_float_output():
    X, Xq, W, H, D = _pair()
    Wt = asymmetric_target_(W.clone(), H, D, alpha=1.0, damp=1e-9)
    lstsq = torch.linalg.lstsq(Xq.double(), (X @ W.T).double()).solution.T.float()
    torch.testing.assert_close(Wt, lstsq, atol=1e-4, rtol=1e-3)
    half = asymmetric_target_(W.clone(), H, D, alpha=0.5, damp=1e-9)
    torch.testing.assert_close(half, (W + Wt) / 2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
def test_shift_through_gptqs_factor_matches_the_standalone_solve(act_order):
    """Inside GPTQ the shift uses GPTQ's own factor of the damped, permuted H^-1: same target."""
    _, _, W, H, D = _pair(seed=2)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    Hp = H.clone() if perm is None else H[perm][:, perm].contiguous()
    damp = 0.01
    _inverse_cholesky_(Hp, None, float(H.diagonal().mean()), damp, 1, "t")
    got = shift_with_factor_(W.clone(), W @ D, Hp, 0.25, perm, rows=7)  # row bands that do not divide out=48
    torch.testing.assert_close(got, asymmetric_target_(W.clone(), H, D, 0.25, damp), atol=1e-5, rtol=1e-4)


def test_observer_accumulates_the_cross_term():
    X, Xq, _, H, D = _pair(n=300)
    o = HessianObserver(X.shape[1], "cpu", cross=True)
    for s in range(0, 300, 100):
        o.update(Xq[s:s + 100].reshape(4, 25, -1), X[s:s + 100].reshape(4, 25, -1))
    torch.testing.assert_close(o.H, H, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o.D, D, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float model"):
        HessianObserver(4, "cpu", cross=True).update(torch.ones(2, 4))


def test_gptq_towards_the_float_output_lowers_that_error():
    X, Xq, W, H, D = _pair(seed=1)
    sch = QuantScheme(3, 16)
    err = {}
    for alpha in (0.0, 0.5, 1.0):  # the drift here is partly noise: only its X-correlated part is recoverable
        q, _ = gptq_quantize(W, H, sch, GPTQConfig(asym_alpha=alpha), wd=W @ D)
        err[alpha] = float((Xq @ q.dequantize().T - X @ W.T).square().mean())
    assert err[1.0] < err[0.5] < err[0.0] and err[1.0] < 0.95 * err[0.0], err
    with pytest.raises(SchemeError, match="asymmetric"):
        GPTQConfig(asym_alpha=1.5)


def test_pipeline_asymmetric_calibration_tracks_the_float_model(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m", "qwen2")
    ids = torch.randint(3, 300, (16, 64), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    errs = {}
    for alpha, scope in ((0.0, "all"), (0.5, "all"), (0.5, "skip-last"), (0.5, "residual")):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        method = GPTQMethod(QuantScheme(3, 32), GPTQConfig(asym_alpha=alpha, asym_scope=scope),
                            scale_dtype=torch.float32)
        assert method.float_inputs == (alpha > 0)
        quantize_model(m, QuantScheme(3, 32), method, tokens=ids, progress=False, scale_dtype=torch.float32)
        with torch.inference_mode():
            errs[alpha, scope] = float((m(ids).logits - ref(ids).logits).pow(2).mean())
    assert errs[0.5, "all"] < 0.8 * errs[0.0, "all"], errs
    # on these tiny models the o_proj group carries most of the gain: all but down_proj keeps it, the
    # norm-fed groups alone (q/k/v, gate/up) little
    assert errs[0.5, "skip-last"] < 0.8 * errs[0.0, "all"], errs
    assert errs[0.5, "residual"] < errs[0.0, "all"], errs


def test_stage_plan_pairs_the_aimed_groups_and_copies_what_changes_before_the_last():
    """Which runs are paired, where D is collected, where the float outputs come from, and which
    float weights must be copied (those quantized before the last paired stage)."""
    from lowbit.models.archs import ARCHS

    spec = ARCHS["Qwen2ForCausalLM"]
    qkv, o, mlp, down = (g.linears for g in spec.groups)

    def plan(**kw):
        seq = kw.pop("true_sequential", True)
        return GPTQMethod(QuantScheme(4, 32), GPTQConfig(**kw), true_sequential=seq).plan(spec)

    stages, copies = plan(asym_alpha=0.0)
    assert [s.groups for s in stages] == [(qkv,), (o,), (mlp,), (down,)]
    assert not any(s.asym or s.float_outputs for s in stages) and copies == ()
    stages, copies = plan(asym_alpha=0.5, asym_scope="all")
    assert [set(s.asym) for s in stages] == [{qkv[0]}, {o[0]}, {mlp[0]}, {down[0]}]
    assert [s.float_outputs for s in stages] == [False, False, False, True] and copies == qkv + o + mlp
    stages, copies = plan(asym_alpha=0.5, asym_scope="skip-last")
    assert [set(s.asym) for s in stages] == [{qkv[0]}, {o[0]}, {mlp[0]}, set()]
    assert [s.float_outputs for s in stages] == [False, False, True, False] and copies == qkv + o
    stages, copies = plan(asym_alpha=0.5, asym_scope="residual")
    assert [set(s.asym) for s in stages] == [{qkv[0]}, set(), {mlp[0]}, set()]
    assert [s.float_outputs for s in stages] == [False, False, True, False] and copies == qkv + o
    stages, copies = plan(asym_alpha=0.5, asym_scope="residual", true_sequential=False)
    assert len(stages) == 1 and stages[0].asym == {qkv[0], mlp[0]} and stages[0].float_outputs and copies == ()
    with pytest.raises(SchemeError, match="scope"):
        GPTQConfig(asym_scope="some")


@pytest.mark.gpu  # the fused bf16 path of D runs on CUDA only (bench/gpu_tests.py); the fp32 path is covered above
def test_fused_half_precision_cross_matches_fp64():
    """D accumulated from bf16 inputs (difference rounded relative to itself, fp32 sums) stays
    within 1e-2 relative of D in fp64, with activations 5% apart, as after quantization."""
    torch.manual_seed(0)
    obs = HessianObserver(512, "cuda", cross=True)
    ref = torch.zeros(512, 512, dtype=torch.float64, device="cuda")
    for _ in range(4):
        xq = (torch.randn(2048, 512, device="cuda") * torch.rand(512, device="cuda") * 3).bfloat16()
        xf = (xq.float() + 0.05 * torch.randn(2048, 512, device="cuda")).bfloat16()
        obs.update(xq, xf)
        ref += (xf.double() - xq.double()).T @ xq.double()
    D = obs.D
    assert D is not None
    ref *= 2 / obs.n
    assert float((D.double() - ref).norm() / ref.norm()) < 1e-2


def test_paired_float_runs_leave_the_float_blocks_outputs(tmp_path):
    """The last stage's float runs go on to the block output: the float model's input of the next
    block, equal to a plain forward of the float block (the quantized weights are not used)."""
    from lowbit.models.archs import block_linears, get_arch, get_blocks
    from lowbit.pipeline.blockwise import BlockContext, capture_inputs
    from lowbit.pipeline.paired import collect_paired, float_weights

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path / "m", "qwen2"), dtype=torch.float32)
    spec = get_arch(model)
    ids = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_inputs(model, ids, spec, torch.device("cpu"))
    block = get_blocks(model, spec)[0]
    ctx = BlockContext(0, block, block_linears(block, spec), spec, torch.device("cpu"), hidden, kwargs[0],
                       fp_inputs=[h + 0.01 for h in hidden])
    want = ctx.forward_all(ctx.fp_inputs)
    done = [n for n in ctx.linears if n.startswith("self_attn.")]  # quantized so far: copied
    fw = float_weights(ctx, done)
    assert set(fw) == set(done)
    for n in done:
        ctx.linears[n].weight.data.mul_(1.5)  # as if quantized: the paired float runs must not see it
    obs = collect_paired(ctx, lambda n, lin: HessianObserver(lin.in_features, "cpu", cross=True),
                         ["mlp.gate_proj"], fw, float_outputs=True)
    assert ctx.fp_outputs is not None and len(ctx.fp_outputs) == len(want)
    for got, ref in zip(ctx.fp_outputs, want, strict=True):
        torch.testing.assert_close(got, ref)
    assert obs["mlp.gate_proj"].n == 3 * 16 and float(obs["mlp.gate_proj"].D.abs().sum()) > 0
    assert all(ctx.linears[n].weight is not fw[n] for n in done)  # the current weights are back


@pytest.mark.gpu  # the TF32 products of the shift run on CUDA only (bench/gpu_tests.py); fp32 is covered above
def test_tf32_shift_matches_fp64():
    """W D and the shift through U in TF32 stay within 1e-2 of the correction's size (fp64 reference),
    and the caller's TF32 setting is restored."""
    _, _, W, H, D = _pair(n=4096, inp=512, out=384, seed=3)
    perm = torch.argsort(H.diagonal(), descending=True)
    Hp = H[perm][:, perm].contiguous()
    _inverse_cholesky_(Hp, None, float(H.diagonal().mean()), 0.01, 1, "t")
    want = asymmetric_target_(W.double(), H.double(), D.double(), 0.5, 0.01)
    before = torch.backends.cuda.matmul.fp32_precision
    Wc = W.cuda()
    got = shift_with_factor_(Wc.clone(), cross_product(Wc, D.cuda()), Hp.cuda(), 0.5, perm.cuda()).cpu().double()
    assert torch.backends.cuda.matmul.fp32_precision == before
    corr = (want - W.double()).norm()
    assert float((got - want).norm() / corr) < 1e-2
