"""AWQ: exact scale folding, lower error than RTN with outlier channels, search/apply split, CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import eval_windows, kld_top1, make_tiny_model_dir
from lowbit.cli import main
from lowbit.core.errors import SchemeError, UnsupportedArchitectureError
from lowbit.core.scheme import QuantScheme
from lowbit.methods.awq import apply_clip, awq_scales, fake_quant, linear_loss, search_clip, search_scales
from lowbit.models.archs import get_arch, get_blocks
from lowbit.pipeline.awq import AWQMethod, AWQResult, parent_name
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.scaling import can_fold, fold_scales
from lowbit.recipe import Recipe

SCHEME = QuantScheme(4, 32, False)


def _ids(n=4, t=32, seed=0):
    return torch.randint(3, 300, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral", "qwen3", "phi3"])
def test_folding_leaves_float_logits_unchanged(tmp_path, arch):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path / arch, arch), dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    spec, g, folded = get_arch(model), torch.Generator().manual_seed(1), 0
    for block in get_blocks(model, spec):
        for group in spec.groups:
            if can_fold(block, group):
                k = block.get_submodule(group.linears[0]).in_features
                fold_scales(block, spec, group, torch.rand(k, generator=g) * 4 + 0.1)
                folded += 1
    with torch.no_grad():
        out = model(ids).logits
    # q/k/v, gate/up, down per block (Phi-3: qkv_proj, gate_up_proj, down_proj through gate_up_proj's up rows);
    # v -> o is skipped under grouped-query attention, and always for Phi-3's fused qkv_proj
    assert folded == 2 * 3
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_scales_are_centred_and_identity_is_a_candidate():
    x_mean = torch.tensor([0.1, 1.0, 10.0, 100.0])
    s = awq_scales(x_mean, None, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0)) and torch.all(s[1:] > s[:-1])
    assert torch.equal(awq_scales(x_mean, None, 0.0), torch.ones(4))
    w = torch.randn(16, 64)
    x = torch.randn(128, 64)
    s, alpha, ratio = search_scales(x.abs().mean(0), [w], fake_quant(SCHEME), 32, linear_loss(x, [w]), grid=10)
    assert ratio <= 1.0 and (alpha == -1.0) == torch.equal(s, torch.ones(64))


def test_duo_both_scores_both_grids():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g) * torch.logspace(-1, 1, 64)
    w = torch.randn(16, 64, generator=g) * torch.logspace(1, -1, 64)
    run = {d: search_scales(x.abs().mean(0), [w], fake_quant(SCHEME), 32, linear_loss(x, [w]), 10, d)
           for d in (True, False, "both")}
    assert run["both"][2] == pytest.approx(min(run[True][2], run[False][2]))
    assert run[True][2] != pytest.approx(run[False][2])  # the grids differ, so "both" has a real choice
    with pytest.raises(ValueError, match="duo"):
        search_scales(x.abs().mean(0), [w], fake_quant(SCHEME), 32, linear_loss(x, [w]), 10, "yes")


def test_clip_search_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    w[:, 5] *= 8  # a heavy column makes shrinking the range pay off elsewhere
    x = torch.randn(256, 64, generator=g)
    q = fake_quant(QuantScheme(3, 32, False))
    m = search_clip(w, x, q, 32)
    wc = w.clone()
    apply_clip(wc, m)
    err = lambda ww: ((x @ w.t() - x @ q(ww).t()) ** 2).mean()  # noqa: E731
    assert err(wc) <= err(w) + 1e-6 and torch.all(m <= w.abs().view(32, 2, 32).amax(-1) + 1e-6)


def _outlier_model(tmp_path, arch="llama"):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path / f"o-{arch}", arch),
                                                 dtype=torch.float32).eval()
    spec = get_arch(model)
    with torch.no_grad():
        for block in get_blocks(model, spec):  # LLM-like outlier channels in the inputs of q/k/v and gate/up
            for norm in ("input_layernorm", "post_attention_layernorm"):
                block.get_submodule(norm).weight[[3, 17, 40]] *= 25
    return model


def _logit_error(model, qmodel, ids):
    with torch.no_grad():
        return ((qmodel(ids).logits - model(ids).logits) ** 2).mean().item()


@pytest.mark.parametrize("objective", ["parent", "linear"])
def test_awq_beats_rtn_with_planted_outliers(tmp_path, objective):
    ref = _outlier_model(tmp_path)
    ids = _ids(8, 32, seed=1)
    errs = {}
    for name in ("rtn", "awq"):
        m = _outlier_model(tmp_path)
        method = AWQMethod(SCHEME, objective=objective) if name == "awq" else "rtn"
        quantize_model(m, SCHEME, method, tokens=_ids(16, 32), progress=False)
        errs[name] = _logit_error(ref, m, ids)
    assert errs["awq"] < 0.8 * errs["rtn"], errs


def test_parent_of_a_group_is_the_smallest_module_holding_it():
    assert parent_name(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")) == "self_attn"
    assert parent_name(("mlp.gate_proj", "mlp.up_proj")) == "mlp"
    assert parent_name(("mlp.down_proj",)) == "mlp.down_proj"
    assert parent_name(("self_attn.o_proj", "mlp.up_proj")) == ""  # the block itself
    with pytest.raises(Exception, match="objective"):
        AWQMethod(SCHEME, objective="block")


def test_parent_loss_scores_the_module_output(tmp_path):
    """The parent loss is zero for the float weights and equals ||P(x) - P'(x)||^2 otherwise."""
    from lowbit.models.archs import block_linears
    from lowbit.pipeline.awq import ParentCalls
    from lowbit.pipeline.blockwise import BlockContext

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path / "q", "qwen2"), dtype=torch.float32)
    spec = get_arch(model)
    block = get_blocks(model, spec)[0]
    inputs, kwargs = [], {}

    def grab(m, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(_ids(4, 16))
    h.remove()
    ctx = BlockContext(0, block, block_linears(block, spec), spec, torch.device("cpu"), inputs, kwargs)
    with ParentCalls(ctx, {"mlp"}, max_tokens=32) as calls:
        ctx.run()
    assert len(calls.calls["mlp"]) == 1  # token-wise: every other row of the 64, as one call
    lins = [ctx.linears["mlp.gate_proj"], ctx.linears["mlp.up_proj"]]
    loss = calls.loss("mlp", lins)
    assert loss([lin.weight.clone() for lin in lins]) == 0.0
    bumped = [lins[0].weight * 1.1, lins[1].weight.clone()]
    x = calls.calls["mlp"][0][0][0]
    with torch.no_grad():
        ref = block.mlp(x)
        mlp = block.mlp
        manual = mlp.down_proj(mlp.act_fn(x @ bumped[0].t()) * mlp.up_proj(x))
    assert loss(bumped) == pytest.approx(float((manual - ref).square().sum()), rel=1e-4)
    assert torch.equal(lins[0].weight, block.mlp.gate_proj.weight) and loss(bumped) > 0  # weights restored


def test_search_then_apply_gives_the_same_weights(tmp_path):
    tokens = _ids(8, 32)
    m1 = _outlier_model(tmp_path)
    method = AWQMethod(SCHEME, clip=True)
    q1 = quantize_model(m1, SCHEME, method, tokens=tokens, progress=False)
    assert method.result.scales and method.result.clips
    method.result.save(tmp_path / "awq.safetensors", SCHEME)
    res, scheme = AWQResult.load(tmp_path / "awq.safetensors")
    assert scheme == SCHEME
    m2 = _outlier_model(tmp_path)
    q2 = quantize_model(m2, SCHEME, AWQMethod(SCHEME, preset=res), tokens=tokens, progress=False)
    for n, qw in q1.items():
        assert torch.equal(qw.codes, q2[n].codes) and torch.equal(qw.scales, q2[n].scales), n
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1  # folded norms too


def test_cli_awq_and_awq_gptq_and_errors(tmp_path, capsys):
    src = make_tiny_model_dir(tmp_path / "tiny", "llama")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(80)))
    common = ["--no-progress", "quantize", str(src), "--scheme", "W4A16_ASYM", "--group-size", "32", "--calib",
              str(corpus), "--calib-samples", "4", "--calib-len", "32"]
    assert main([*common, "--method", "awq", "--awq-clip", "--awq-save", str(tmp_path / "s.safetensors"),
                 "-o", str(tmp_path / "a")]) == 0
    assert main([*common, "--method", "awq", "--no-awq-clip", "--awq-save", str(tmp_path / "n.safetensors"),
                 "-o", str(tmp_path / "n")]) == 0
    recipe = Recipe.from_file(tmp_path / "n" / "recipe.yaml").method
    assert recipe.max_tokens == AWQMethod.max_tokens == 16384 and recipe.objective == "parent" and not recipe.clip
    assert main([*common, "--method", "awq", "--awq-tokens", "64", "-o", str(tmp_path / "t")]) == 0
    assert Recipe.from_file(tmp_path / "t" / "recipe.yaml").method.max_tokens == 64
    from lowbit.pipeline.awq import AWQResult

    with_clip, no_clip = AWQResult.load(tmp_path / "s.safetensors")[0], AWQResult.load(tmp_path / "n.safetensors")[0]
    first = {k: v for k, v in with_clip.alphas.items() if ".layers.0." in k}  # later blocks see clipped inputs
    assert with_clip.clips and not no_clip.clips and first and all(no_clip.alphas[k] == v for k, v in first.items())
    assert main([*common, "--method", "awq+gptq", "--awq-load", str(tmp_path / "s.safetensors"),
                 "-o", str(tmp_path / "ag")]) == 0
    from transformers import CompressedTensorsConfig

    from lowbit.formats.awq_gemm import load_awq_gemm
    from lowbit.formats.compressed_tensors import load_quantized

    # asymmetric pack-quantized loads in transformers 5.24 + compressed-tensors 0.20 only decompressed. It
    # forms s (q - z) in the scales' dtype (bf16): every weight is ours rounded to bf16, bit for bit (the
    # float32 product of a bf16 scale and a small integer is exact, so both round the same value)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ag", dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = load_quantized(tmp_path / "ag")[0]
    for name, mod in ours.named_modules():
        if hasattr(mod, "qweight"):
            want = mod.qweight().dequantize(torch.float32).to(torch.bfloat16).float()
            assert torch.equal(theirs.get_submodule(name).weight, want), name
    ids = _ids(1, 20)
    with torch.inference_mode():
        a, b = theirs(ids).logits, ours(ids).logits
    # weights <= 2^-9 relative apart (bf16 rounding): logits move by about that fraction of their size
    # (measured 1.1e-3 on max |logit| 0.6); bound 2^-7 of the largest logit
    assert (a - b).abs().max() <= 2**-7 * b.abs().max(), (a - b).abs().max()
    assert main([*common, "--method", "awq", "--awq-objective", "linear", "--format", "awq",
                 "-o", str(tmp_path / "gemm")]) == 0
    assert json.loads((tmp_path / "gemm" / "config.json").read_text())["quantization_config"]["version"] == "gemm"
    res = tmp_path / "eval.json"
    assert main(["--no-progress", "eval", str(tmp_path / "gemm"), "--reference", str(src), "--data", str(corpus),
                 "--ctx", "32", "--max-windows", "2", "--json", str(res)]) == 0
    got = json.loads(res.read_text())["results"]["gemm"]
    # the eval's KLD is the one of the GEMM folder as lowbit's loader reads it, against the float model, on
    # the gptq protocol's windows (float32 log-softmax on both sides: ~1e-6 apart, see tests/test_cli.py)
    windows = eval_windows(tmp_path / "gemm", corpus.read_text(), 32, 2)
    kld, _ = kld_top1(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), load_awq_gemm(
        tmp_path / "gemm")[0], windows)
    assert got["n_tokens"] == 2 * 31 and abs(got["kld_mean"] - kld) <= 2e-6, (got["kld_mean"], kld)
    assert main([*common, "--scheme", "W3A16", "--format", "awq", "-o", str(tmp_path / "bad")]) == 2
    assert main([*common, "--method", "rtn", "--awq-load", str(tmp_path / "s.safetensors"),
                 "-o", str(tmp_path / "bad")]) == 2
    assert "awq" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    assert main([*common, "--method", "awq", "--awq-load", str(tmp_path / "junk.safetensors"),
                 "-o", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_model_without_mapping_is_a_clear_error():
    from torch import nn

    with pytest.raises(UnsupportedArchitectureError, match="no architecture table entry"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), SCHEME, AWQMethod(SCHEME), tokens=_ids(), progress=False)


def test_float_propagation_feeds_every_block_the_float_models_inputs(tmp_path):
    tokens = _ids(4, 32)
    ref = _outlier_model(tmp_path)
    with torch.no_grad():
        want = ref(tokens, output_hidden_states=True).hidden_states[1]  # the float model's input of block 1
    seen: dict[int, torch.Tensor] = {}

    class Spy(AWQMethod):
        def quantize_block(self, ctx):
            seen[ctx.index] = torch.cat(ctx.inputs)
            return super().quantize_block(ctx)

    got, methods = {}, {}
    for prop in ("float", "quantized"):
        methods[prop] = Spy(SCHEME, propagate=prop)
        got[prop] = quantize_model(_outlier_model(tmp_path), SCHEME, methods[prop], tokens=tokens, progress=False)
        err = (seen[1] - want).abs().max().item()
        assert (err < 1e-5) if prop == "float" else (err > 1e-3), (prop, err)
    # the preset path passes on the same float outputs: the same codes as the search
    applied = quantize_model(_outlier_model(tmp_path), SCHEME,
                             Spy(SCHEME, propagate="float", preset=methods["float"].result),
                             tokens=tokens, progress=False)
    assert torch.allclose(seen[1], want, atol=1e-5)
    for n, qw in got["float"].items():
        assert torch.equal(qw.codes, applied[n].codes), n
    with pytest.raises(SchemeError, match="propagate"):
        AWQMethod(SCHEME, propagate="float", inner=AWQMethod(SCHEME))
