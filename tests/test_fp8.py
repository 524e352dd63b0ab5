"""FP8 E4M3: numerics (against compressed-tensors' own quantizer), the runtime, the artifact, real clients."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.core import fp8_linear
from lowbit.core.dtypes import DT_PRESETS, get_dt_scheme
from lowbit.core.errors import FormatError, SchemeError
from lowbit.core.fp8_linear import FP8Linear, FP8Weight, quantize_act_per_token, replace_with_fp8, saturate_cast
from lowbit.formats import ct_float
from lowbit.methods.fp8 import quantize_fp8
from lowbit.pipeline.blockwise import BlockMethod, run_blockwise

F8 = torch.float8_e4m3fn
FP8, DYN = DT_PRESETS["FP8"], DT_PRESETS["FP8_DYNAMIC"]
BLOCK = get_dt_scheme("FP8", block_size=32)
DYN_BLOCK = get_dt_scheme("FP8_DYNAMIC", block_size=32)
HALF_ULP, SUB_STEP = 2.0**-4, 2.0**-10  # E4M3: relative half unit (3-bit mantissa); half the subnormal step


def _randn(*shape, seed=0, std=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def _ids():
    return torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ numerics


def test_cast_rounds_to_nearest_even_and_saturates():
    x = torch.tensor([1.0625, 1.1875, 447.0, 460.0, 1e6, -1e30, float("inf"), 0.0])
    got = saturate_cast(x, torch.tensor(1.0)).float()
    # ties: 1.0625 is halfway 1.0 | 1.125 -> even mantissa 1.0; 1.1875 halfway 1.125 | 1.25 -> 1.25
    assert got.tolist() == [1.0, 1.25, 448.0, 448.0, 448.0, -448.0, 448.0, 0.0]
    w = _randn(8, 64)
    q = saturate_cast(w, torch.full((8, 1), w.abs().max().item() / 448 / 4))  # 4x too small: most saturate
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == 448
    assert (q.float().abs() == 448).sum() > 0


def test_scale_is_rounded_before_dividing():
    """A bfloat16 scale that rounds *down* saturates the row maximum at 448 (no NaN); W_hat uses the stored scale."""
    amax = torch.tensor(448 * 1.0039)  # amax / 448 = 1.0039 rounds down to 1.0 in bfloat16
    w = torch.tensor([[amax.item(), -1.0, 0.5]])
    fw = quantize_fp8(w, FP8)
    assert fw.scale.dtype == torch.bfloat16 and fw.scale.item() == 1.0
    assert fw.weight.float()[0, 0] == 448
    assert torch.equal(fw.dequantize(), fw.weight.float() * fw.scale.float())
    small = _randn(4, 64, std=1e-3)  # amax / 448 ~ 7e-6: a float16 *subnormal* scale, kept (not raised to 6e-5)
    fw16 = quantize_fp8(small, FP8, scale_dtype=torch.float16)
    assert torch.equal(fw16.scale, (small.abs().amax(1, keepdim=True) / 448).half())
    assert fw16.weight.float().abs().amax() > 400


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", [FP8, BLOCK], ids=["channel", "block32"])
def test_bit_exact_with_compressed_tensors(scheme, wdtype):
    """Same scale -> the same float8 codes as compressed-tensors' ``quantize``, and the same scales as its observer."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _randn(100, 96, std=0.02).to(wdtype)  # 100 rows: a partial last block
    w[7] = 0
    fw = quantize_fp8(w, scheme)
    bs = scheme.block_size
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel" if bs is None else "block", symmetric=True,
                            block_structure=None if bs is None else [bs, bs])
    theirs = quantize(w.float(), fw.scale, None, args, dtype=F8)
    assert theirs.dtype == F8 and torch.equal(theirs.view(torch.uint8), fw.weight.view(torch.uint8))
    deq = dequantize(fw.weight, fw.scale.float(), None, args, dtype=torch.float32)
    assert torch.equal(deq, fw.dequantize())
    if scheme.block_size is None:  # their min/max observer, in the weight's dtype, then bfloat16 storage
        s, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
        nz = w.abs().amax(1) > 0
        assert torch.equal(s.to(torch.bfloat16)[nz], fw.scale[nz])
    if wdtype == torch.bfloat16:
        # Given the bfloat16 tensor itself, compressed-tensors divides in bfloat16 and rounds the quotient
        # twice (bf16, then fp8): ~3% of codes land one step away -- never closer to W than ours.
        native = quantize(w, fw.scale, None, args, dtype=F8).float() * fw.full_scale()
        assert ((native - fw.dequantize()).abs() > 0).float().mean() < 0.06
        assert ((fw.dequantize() - w.float()).abs() <= (native - w.float()).abs()).all()


@pytest.mark.parametrize("scheme", [FP8, BLOCK], ids=["channel", "block32"])
def test_dequantization_error_bound_and_zeros(scheme):
    """|W_hat - W| <= 2^-4 |W| + 2^-10 s elementwise (normal range: half a mantissa unit; subnormals)."""
    w = _randn(96, 160, std=0.05) * torch.logspace(-3, 0, 160)  # columns over 3 decades: subnormals too
    w[:32, :32], w[40] = 0, 0  # a zero block (and rows zero in that block only), a zero row
    fw = quantize_fp8(w, scheme)
    assert torch.isfinite(fw.scale.float()).all() and (fw.scale.float() > 0).all()
    err = (fw.dequantize() - w).abs()
    bound = HALF_ULP * w.abs() + SUB_STEP * fw.full_scale()
    assert (err <= bound * (1 + 1e-6)).all(), (err - bound).max()  # no NaN; zeros stay exactly 0
    rel = (err.norm() / w.norm()).item()
    assert 0.005 < rel < 0.04, rel  # uniform relative rounding error: RMS ~ 2^-4 / sqrt(3) ~ 0.036 at most
    assert torch.equal(quantize_fp8(torch.zeros(16, 32), scheme).dequantize(), torch.zeros(16, 32))


def test_per_token_activation_quantization():
    x = _randn(3, 5, 64) * torch.logspace(-2, 2, 5)[None, :, None]  # tokens over 4 decades
    x[1, 2] = 0  # a token of zeros
    x8, sx = quantize_act_per_token(x)
    assert x8.dtype == F8 and x8.shape == x.shape and sx.shape == (3, 5, 1) and sx.dtype == torch.float32
    back = x8.float() * sx
    assert torch.isfinite(back).all() and (back[1, 2] == 0).all()
    assert ((back - x).abs() <= HALF_ULP * x.abs() + SUB_STEP * sx + 1e-30).all()
    assert torch.allclose(x8.float().abs().amax(-1)[x.abs().amax(-1) > 0], torch.tensor(448.0))  # full range used
    x2 = x.clone()
    x2[0, 0, 0] = 1e4  # an outlier token changes its own scale only
    assert torch.equal(quantize_act_per_token(x2)[1][0, 1:], sx[0, 1:])


# ------------------------------------------------------------------------------------------- runtime


def _layer(scheme, seed=0, bias=True):
    w = _randn(48, 64, seed=seed, std=0.05)
    b = _randn(48, seed=seed + 1, std=0.1) if bias else None
    return w, b, FP8Linear.from_weight(quantize_fp8(w, scheme), b)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("w8a8", [DYN, DYN_BLOCK], ids=["channel", "block32"])
def test_w8a8_output_close_to_float_and_worse_than_weight_only(w8a8):
    """Each product x_j w_j carries two independent E4M3 roundings (RMS <= 2^-4/sqrt(3) ~ 0.036 each):
    relative output error about sqrt(2) * 0.036 ~ 0.05 for incoherent random data; bound it at 0.1."""
    x = _randn(4, 7, 64, seed=5)
    w, b, m8 = _layer(w8a8)
    _, _, mw = _layer(w8a8.with_options(activations=None))
    ref = torch.nn.functional.linear(x, w, b)
    with torch.inference_mode():
        e8, ew = _rel(m8(x), ref), _rel(mw(x), ref)
    assert e8 < 0.1 and ew < 0.05 and e8 > ew, (e8, ew)


def test_emulated_gemm_is_torch_scaled_mm(monkeypatch):
    """The CPU fallback is the math of ``torch._scaled_mm`` with row-wise scales (CPU torch runs it too);
    the module's ``_scaled_mm`` branch (forced on) gives the emulated result rounded to bfloat16."""
    x = _randn(2, 8, 64, seed=3)
    _, _, m = _layer(DYN)
    x8, sx = quantize_act_per_token(x)
    ref = torch._scaled_mm(x8.reshape(-1, 64), m.weight.t(), scale_a=sx.reshape(-1, 1),
                           scale_b=m.weight_scale.float().reshape(1, -1), out_dtype=torch.float32)
    assert torch.allclose(m._emulated_gemm(x8, sx, x.device).reshape(-1, 48), ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        emulated = m(x)
        monkeypatch.setattr(fp8_linear, "_scaled_mm_ok", lambda a, w: True)
        hw = m(x)
    assert not torch.equal(hw, emulated) and torch.allclose(hw, emulated, rtol=2e-2, atol=2e-2)


def test_weight_only_cache_and_module_to_dtype():
    _, _, m = _layer(FP8)
    x = _randn(2, 64, seed=6)
    m.cache = True
    y = m(x)
    assert m._dense is not None and m._dense.dtype == torch.float32 and torch.equal(m(x), y)
    m.cache, m._dense = False, None
    assert torch.equal(m(x), y) and m._dense is None
    m.double().float()  # casts the bias (exactly, here), never the stored float8 weight and its scale
    assert m.weight.dtype == F8 and m.weight_scale.dtype == torch.bfloat16 and torch.equal(m(x), y)


# ------------------------------------------------------------------------------------------- artifact


def _quantized(tmp_path, scheme, arch="llama"):
    d = make_tiny_model_dir(tmp_path / f"src-{arch}", arch)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref = copy.deepcopy(model)
    class FP8Only(BlockMethod):  # a minimal block method
        def quantize_block(self, ctx):  # type: ignore[no-untyped-def]
            return {n: quantize_fp8(lin.weight, scheme) for n, lin in ctx.linears.items()}

    method = FP8Only()
    fws = run_blockwise(model, method, progress=False)  # model now holds W_hat (weight fake-quant)
    return d, ref, model, fws


@pytest.mark.parametrize("scheme", [FP8, BLOCK, DYN, DYN_BLOCK], ids=lambda s: s.label.replace(" ", "-"))
def test_round_trip_is_exact(tmp_path, scheme):
    """save_fp8 -> load_fp8: same codes and scales, and the logits of the in-memory FP8 model, bit for bit."""
    _, ref, fake, fws = _quantized(tmp_path, scheme, arch="qwen2")  # qwen2: linears with bias
    out = ct_float.save_fp8(fake, fws, tmp_path / "out", scheme=scheme, dtype=torch.float32)
    loaded, got = ct_float.load_fp8(out)
    assert got == scheme.with_options(name=None)
    for name, fw in fws.items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, FP8Linear)
        assert torch.equal(mod.weight.view(torch.uint8), fw.weight.view(torch.uint8))
        assert torch.equal(mod.weight_scale, fw.scale)
    in_memory = replace_with_fp8(ref, fws)
    with torch.inference_mode():
        a = loaded(_ids()).logits
        assert torch.equal(a, in_memory(_ids()).logits)
        if scheme.activations is None:  # weight-only: also the pipeline's fake-quantized nn.Linear model
            assert torch.equal(a, fake(_ids()).logits)


@pytest.mark.parametrize("scheme", [FP8, BLOCK, DYN], ids=lambda s: s.label.replace(" ", "-"))
def test_layout_matches_compressed_tensors(tmp_path, scheme):
    """config.json validates with compressed-tensors' schema; args equal its presets; format as it infers."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, preset_name_to_scheme
    from transformers import AutoTokenizer

    d, _, fake, fws = _quantized(tmp_path, scheme)
    out = ct_float.save_fp8(fake, fws, tmp_path / "out", scheme=scheme, tokenizer=AutoTokenizer.from_pretrained(d))
    cfg = json.loads((out / "config.json").read_text())
    assert ct_float.is_fp8_artifact(cfg)
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    group = qc.config_groups["group_0"]
    if scheme.activations:
        preset = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
        assert group.weights == preset.weights and group.input_activations == preset.input_activations
    else:
        want = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                                strategy="channel" if scheme.block_size is None else "block",
                                block_structure=None if scheme.block_size is None else [32, 32])
        assert group.weights == want and group.input_activations is None
    assert cfg["quantization_config"]["format"] == infer_module_format(torch.nn.Linear, group).value
    assert cfg["quantization_config"]["ignore"] == ["lm_head"]
    t = load_file(str(out / "model.safetensors"))
    n = "model.layers.0.mlp.down_proj"  # (64, 128)
    assert t[f"{n}.weight"].dtype == F8 and t[f"{n}.weight"].shape == (64, 128)
    assert t[f"{n}.weight_scale"].dtype == torch.bfloat16  # what compressed-tensors writes for a bf16 model
    assert t[f"{n}.weight_scale"].shape == ((64, 1) if scheme.block_size is None else (2, 4))
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    recipe = json.loads((out / "provenance.json").read_text())
    assert recipe["scheme"] == scheme.to_dict()
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("scheme", [FP8, BLOCK, DYN, DYN_BLOCK], ids=lambda s: s.label.replace(" ", "-"))
def test_transformers_loads_our_artifact(tmp_path, scheme):
    """The real client: transformers + compressed-tensors on CPU reads the folder; logits equal ours.

    transformers builds the modules compressed (float8 ``weight`` + ``weight_scale``), and the first
    forward decompresses every weight to ``float(q) * scale`` in the model dtype (exact in float32).
    For FP8_DYNAMIC the decompressed modules keep compressed-tensors' quantized forward, which
    fake-quantizes the *input activations* per token (scale = amax / 448, the same saturating
    float8 cast) before the float32 matmul: activation quantization IS applied on CPU, so their
    logits match ours (to float32 summation order) and differ from the weight-only logits.
    """
    pytest.importorskip("compressed_tensors")
    _, _, fake, fws = _quantized(tmp_path, scheme)
    out = ct_float.save_fp8(fake, fws, tmp_path / "out", scheme=scheme)
    ours, _ = ct_float.load_fp8(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.inference_mode():
        a, b = ours(_ids()).logits, theirs(_ids()).logits
    for name, fw in fws.items():  # their decompressed weights are our W_hat exactly
        assert torch.equal(theirs.get_submodule(name).weight, fw.dequantize()), name
    if scheme.activations is None:
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        cfg = json.loads((out / "config.json").read_text())  # the same folder labelled float-quantized: same model
        qc = cfg["quantization_config"]
        qc["format"] = qc["config_groups"]["group_0"]["format"] = "float-quantized"
        (out / "config.json").write_text(json.dumps(cfg))
        relabelled = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.inference_mode():
            assert torch.equal(relabelled(_ids()).logits, b)
        assert torch.equal(ct_float.load_fp8(out)[0](_ids()).logits, a)
        return
    mod = theirs.get_submodule("model.layers.0.mlp.down_proj")
    assert mod.quantization_scheme.input_activations.strategy == "token"
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    weight_only, _ = ct_float.load_fp8(out)
    for m in weight_only.modules():
        if isinstance(m, FP8Linear):
            m.scheme = m.scheme.with_options(activations=None)
    with torch.inference_mode():
        assert (weight_only(_ids()).logits - b).abs().max() > 100 * (a - b).abs().max()


def test_format_errors_are_clear(tmp_path):
    from lowbit.core.scheme import QuantScheme
    from lowbit.formats import compressed_tensors as ct
    from lowbit.pipeline.quantize import quantize_model

    d = make_tiny_model_dir(tmp_path / "src", "llama")
    with pytest.raises(FormatError, match="not a compressed-tensors float8"):
        ct_float.load_fp8(d)  # a plain model
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    out = ct.save_quantized(model, quantize_model(model, QuantScheme(4, 32), progress=False), tmp_path / "int4")
    cfg = json.loads((out / "config.json").read_text())
    assert not ct_float.is_fp8_artifact(cfg) and not ct_float.is_fp8_artifact({})
    with pytest.raises(FormatError, match="pack-quantized"):
        ct_float.load_fp8(out)
    _, _, fake, fws = _quantized(tmp_path, FP8)
    name = next(iter(fws))
    fws[name] = FP8Weight(fws[name].weight, fws[name].scale, DYN)
    with pytest.raises(FormatError, match="one scheme per checkpoint"):
        ct_float.save_fp8(fake, fws, tmp_path / "fp8", scheme=FP8)


# ------------------------------------------------------------------------------------------- errors


def test_errors_are_clear(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    assert not fp8_linear.fp8_available()
    with pytest.raises(SchemeError, match=r"torch >= 2\.1 with float8 dtypes.*upgrade torch"):
        quantize_fp8(torch.ones(4, 4), FP8)
    with pytest.raises(SchemeError, match="upgrade torch"):
        FP8Linear(4, 4, FP8)
    monkeypatch.undo()
    with pytest.raises(SchemeError, match="FP8 scheme"):
        quantize_fp8(torch.ones(4, 64), DT_PRESETS["NF4"])
    with pytest.raises(SchemeError, match="2-D"):
        quantize_fp8(torch.ones(4), FP8)
    with pytest.raises(SchemeError, match="inf or NaN"):
        quantize_fp8(torch.tensor([[1.0, float("nan")]]), FP8)
    fw = quantize_fp8(torch.ones(4, 8), FP8)
    with pytest.raises(ValueError, match="scale must have shape"):
        FP8Weight(fw.weight, fw.scale.t(), FP8)
