"""SmoothQuant W8A8: the scale math, exact folding, the int8 runtime, the int-quantized artifact, real clients."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.core import w8a8_linear
from lowbit.core.errors import FormatError, SchemeError
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import PRESETS, QuantScheme
from lowbit.core.w8a8_linear import W8A8Linear, quantize_act_int8, replace_with_w8a8, w8a8_reference
from lowbit.formats import ct_int8
from lowbit.methods.smoothquant import act_scale_static, quantize_w8, smooth_scales
from lowbit.models.archs import block_linears, get_arch, get_blocks
from lowbit.pipeline.blockwise import BlockContext, capture_inputs
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.smoothquant import SmoothQuantMethod

DYN, STATIC = PRESETS["W8A8"], PRESETS["W8A8_STATIC"]


def _randn(*shape, seed=0, std=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def _ids():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _calib():
    return torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _logits(model):
    with torch.inference_mode():
        return model(_ids()).logits.float()


# ------------------------------------------------------------------------------------------- the math


def test_smooth_scales_math():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0, 2.0])
    w1, w2 = torch.tensor([[1.0, -2.0, 1.0, 0.5, 0.0]]), torch.tensor([[-4.0, 1.0, 3.0, 0.25, 0.0], [0, 0, 0, 1, 0]])
    s = smooth_scales(a, [w1, w2], alpha=0.5)
    w = torch.tensor([4.0, 2.0, 3.0, 1.0, 0.0])  # max over both weights, per column
    live = torch.tensor([True, True, False, True, False])  # channel 2: dead input; channel 4: zero weights
    raw = a[live].sqrt() / w[live].sqrt()
    assert torch.allclose(s[live], raw / raw.log().mean().exp(), rtol=1e-6)  # normalised: geometric mean 1
    assert s[~live].tolist() == [1.0, 1.0] and torch.allclose(s[live].log().mean(), torch.tensor(0.0), atol=1e-6)
    # alpha = 0.5: after smoothing max|X'_j| = max|W'_j| (times one constant) -- the difficulty is shared
    ratio = (a[live] / s[live]) / (w[live] * s[live])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)
    s1, s0 = smooth_scales(a, [w1, w2], alpha=1.0), smooth_scales(a, [w1, w2], alpha=0.0)
    assert torch.allclose(s1[live] / s1[0], a[live] / a[0]) and torch.allclose(s0[live] * w[live], s0[0] * w[0])
    assert smooth_scales(torch.zeros(5), [w1]).eq(1).all()  # no statistics: no smoothing
    with pytest.raises(SchemeError, match=r"alpha must lie in \[0, 1\]"):
        smooth_scales(a, [w1], alpha=1.5)
    with pytest.raises(SchemeError, match="one input size"):
        smooth_scales(a, [w1, torch.ones(2, 4)])
    with pytest.raises(SchemeError, match="NaN or Inf"):
        smooth_scales(torch.full((5,), float("nan")), [w1])


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_int8_weights_match_compressed_tensors(wdtype):
    """Signed codes (ours - 128) equal compressed-tensors' ``quantize``; the scale equals its observer's."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _randn(48, 96, std=0.02).to(wdtype)
    w[5] = 0
    qw = quantize_w8(w)
    assert qw.scales.shape == (48, 1) and qw.scales.dtype == torch.bfloat16 and (qw.zeros == 128).all()
    args = preset_name_to_scheme("W8A8", ["Linear"]).weights
    signed = qw.codes.to(torch.int16) - 128
    theirs = quantize(w.float(), qw.scales.float(), torch.zeros(48, 1), args, dtype=torch.int8)
    assert theirs.dtype == torch.int8 and torch.equal(theirs.to(torch.int16), signed)
    s, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)  # amax / 127.5
    nz = w.abs().amax(1) > 0
    assert torch.equal(s.to(torch.bfloat16)[nz], qw.scales[nz])
    # half a step, except where amax / 127.5 maps the largest positive weight to 127.5: clipped to 127
    err, step = (qw.dequantize() - w.float()).abs(), qw.scales.float()
    inside = qw.codes < 255
    assert (err <= step * 0.5 * (1 + 1e-6))[inside].all() and (err <= step).all()


def test_static_activation_scale():
    assert act_scale_static(torch.tensor([1.0, -12.7, 3.0])).item() == pytest.approx(0.1, rel=1e-6)
    s = act_scale_static(torch.tensor([12.7]), torch.bfloat16)
    assert s.dtype == torch.float32 and s.item() == torch.tensor(0.1).to(torch.bfloat16).item()
    assert act_scale_static(torch.zeros(3), torch.bfloat16).item() == torch.finfo(torch.bfloat16).tiny


def test_outlier_channels_smoothquant_beats_plain_w8a8():
    """A linear whose input has 4 channels 50x larger than the rest, their weight columns 50x smaller (what a
    norm weight amplifying a channel produces): per-token int8 spends its range on them, the other channels
    get ~1 level. Measured relative output error: plain W8A8 0.178, SmoothQuant (alpha 0.5) 0.009."""
    x = _randn(256, 128, seed=1)
    w = _randn(96, 128, seed=2, std=0.05)
    ch = [3, 40, 77, 100]
    x[:, ch] *= 50
    w[:, ch] /= 50
    ref = x @ w.t()
    plain = W8A8Linear.from_qweight(quantize_w8(w, DYN), DYN)
    s = smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    smooth = W8A8Linear.from_qweight(quantize_w8(w * s, DYN), DYN)
    with torch.inference_mode():
        e_plain, e_smooth = _rel(plain(x), ref), _rel(smooth(x / s), ref)
    assert e_smooth < 0.015 and e_plain > 0.1, (e_smooth, e_plain)


# ------------------------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("scheme", [DYN, STATIC], ids=["dynamic", "static"])
def test_w8a8_linear_is_an_exact_int8_gemm(monkeypatch, scheme):
    """The int8 path equals the same quantized operands multiplied in float64 (to float32 rounding);
    it goes through ``int8_matmul`` with int8 operands; the output is within the expected error of the float layer."""
    w, b = _randn(48, 64, seed=3, std=0.05), _randn(48, seed=4, std=0.1)
    x = _randn(3, 7, 64, seed=5)
    x[1, 2] = 0  # an all-zero token
    iscale = act_scale_static(x.abs().amax() * 0.8, torch.bfloat16) if scheme is STATIC else None  # some clip
    m = W8A8Linear.from_qweight(quantize_w8(w, scheme), scheme, b, iscale)
    calls, real = [], w8a8_linear.int8_matmul

    def spy(a, c):
        calls.append((a.dtype, c.dtype))
        return real(a, c)

    monkeypatch.setattr(w8a8_linear, "int8_matmul", spy)
    with torch.inference_mode():
        y = m(x)
    assert calls == [(torch.int8, torch.int8)] and y.shape == (3, 7, 48) and torch.isfinite(y).all()
    ref = w8a8_reference(x.reshape(-1, 64), m.weight, m.weight_scale, m.input_scale, b).reshape(3, 7, 48)
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6), (y - ref).abs().max()
    assert torch.equal(y[1, 2], b)  # zero token: exactly the bias, no NaN
    # error vs the float layer: ~0.5% from each of two int8 roundings (uniform, step amax/127) for Gaussian data
    bound = 0.02 if scheme is DYN else 0.05  # the static scale clips the largest 20% of the range
    assert _rel(y, torch.nn.functional.linear(x, w, b)) < bound
    xq, sx = quantize_act_int8(x, m.input_scale)
    assert xq.dtype == torch.int8 and int(xq.min()) >= -128 and int(xq.max()) <= 127
    if scheme is DYN:
        assert xq.abs().amax(-1)[x.abs().amax(-1) > 0].eq(127).all()  # each token uses its full range


def test_runtime_cache_dtypes_and_bf16():
    w = _randn(48, 64, seed=3, std=0.05)
    m = W8A8Linear.from_qweight(quantize_w8(w), DYN, _randn(48, seed=4))
    x = _randn(5, 64, seed=6)
    y = m(x)
    m.cache = True
    assert torch.equal(m(x), y) and m._wt is not None and m._wt.is_contiguous() and m._wt.shape == (64, 48)
    m.double().float()  # casts the bias exactly, never the stored int8 weight and bfloat16 scale
    assert m.weight.dtype == torch.int8 and m.weight_scale.dtype == torch.bfloat16 and torch.equal(m(x), y)
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), y, rtol=1e-2, atol=1e-2)
    assert torch.equal(m.dequantized_weight(), quantize_w8(w).dequantize())
    with pytest.raises(ValueError, match="input_scale must be given"):
        W8A8Linear.from_qweight(quantize_w8(w), STATIC)
    with pytest.raises(ValueError, match="int8 symmetric per-channel"):
        W8A8Linear.from_qweight(QuantizedWeight(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1),
                                                torch.zeros(4, 1, dtype=torch.uint8), QuantScheme(8, None, False)), DYN)


# ------------------------------------------------------------------------------------------- pipeline


def _plant_outliers(model, k=30.0):
    """Multiply 4 channels of every block's attention / MLP norm by ``k`` and divide the matching columns of
    the linears it feeds by ``k``: the float model is unchanged, its q/k/v and gate/up inputs get outliers."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, lins in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                               (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                ch = torch.randperm(norm.weight.numel(), generator=g)[:4]
                norm.weight[ch] *= k
                parent = layer.self_attn if lins[0] == "q_proj" else layer.mlp
                for n in lins:
                    getattr(parent, n).weight[:, ch] /= k
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_smoothing_leaves_the_float_model_unchanged(tmp_path, arch):
    """The method's smoothing step alone (no quantization) on every block: logits unchanged (rtol 1e-5);
    v -> o is skipped under grouped-query attention (4 heads, 2 kv heads); the outlier channels are flattened."""
    d = make_tiny_model_dir(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    if arch != "gemma3":
        _plant_outliers(model)
    ref = _logits(model)
    method, spec = SmoothQuantMethod(STATIC, alpha=0.5, scale_dtype=torch.float32), get_arch(model)
    hidden, kwargs = capture_inputs(model, _calib(), spec, torch.device("cpu"))
    for i, block in enumerate(get_blocks(model, spec)):
        ctx = BlockContext(i, block, block_linears(block, spec, i), spec, torch.device("cpu"), hidden, kwargs[i])
        method.smooth(ctx)
        ctx.run(keep_outputs=True)
        hidden = ctx.outputs
    got = _logits(model)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (got - ref).abs().max()
    mlp_norm = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    assert sorted(k.split(".", 3)[-1] for k in method.smooth_scales if ".0." in k) == [
        "input_layernorm", "mlp.up_proj", mlp_norm]
    assert len(method.input_scales) == 2 * 7 and all(v > 0 for v in method.input_scales.values())
    if arch != "gemma3":  # the planted 30x channels: max/median of the smoothed input's absmax drops several-fold
        a = method.act_absmax["model.layers.0.self_attn.q_proj"]
        s = method.smooth_scales["model.layers.0.input_layernorm"]
        before, after = a * s, a
        assert (after.max() / after.median()) < (before.max() / before.median()) / 3


@pytest.mark.parametrize("scheme", [DYN, STATIC], ids=["dynamic", "static"])
def test_pipeline_artifact_close_to_float_and_smoothing_helps(tmp_path, scheme):
    """quantize_model + SmoothQuantMethod on a tiny Llama with planted outliers -> bf16 artifact -> load:
    logits close to the float model; ~10x closer than W8A8 without smoothing (measured 0.010 vs 0.089 dynamic)."""
    d = make_tiny_model_dir(tmp_path / "src", "llama")
    ref = _plant_outliers(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval())
    r = _logits(ref)
    errs = {}
    for alpha in (0.5, None):
        model, method = copy.deepcopy(ref), SmoothQuantMethod(scheme, alpha=alpha)
        qws = quantize_model(model, scheme, method, tokens=_calib(), progress=False)
        assert sorted(qws) == sorted(n for n, m in model.named_modules() if n.startswith("model.layers.")
                                     and isinstance(m, torch.nn.Linear))
        out = ct_int8.save_w8a8(model, qws, tmp_path / f"a{alpha}", scheme=scheme,
                                input_scales=method.input_scales or None, recipe={"alpha": alpha})
        errs[alpha] = _rel(_logits(ct_int8.load_w8a8(out)[0]), r)
    assert errs[0.5] < 0.03 and errs[0.5] < errs[None] / 4, errs


# ------------------------------------------------------------------------------------------- artifact


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """bf16 tiny Qwen2 (linears with bias), SmoothQuant W8A8 dynamic and static: {label: (folder, model, qws, m)}."""
    root = tmp_path_factory.mktemp("w8a8")
    d = make_tiny_model_dir(root / "src", "qwen2", dtype="bfloat16")
    out = {}
    for label, scheme in (("dynamic", DYN), ("static", STATIC)):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
        method = SmoothQuantMethod(scheme, alpha=0.5)
        qws = quantize_model(model, scheme, method, tokens=_calib(), progress=False)
        folder = ct_int8.save_w8a8(model, qws, root / label, scheme=scheme, input_scales=method.input_scales or None)
        out[label] = (folder, model, qws, method)
    return out


@pytest.mark.parametrize("label", ["dynamic", "static"])
def test_round_trip_is_exact(artifacts, label):
    folder, model, qws, method = artifacts[label]
    scheme = DYN if label == "dynamic" else STATIC
    loaded, got = ct_int8.load_w8a8(folder, dtype=torch.bfloat16)
    assert got == scheme.with_options(name=None)
    for name, qw in qws.items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, W8A8Linear) and torch.equal(mod.weight, (qw.codes.to(torch.int16) - 128).to(torch.int8))
        assert torch.equal(mod.weight_scale, qw.scales)
        assert (mod.bias is not None) == name.endswith(("q_proj", "k_proj", "v_proj"))  # Qwen2: q/k/v have biases
        if label == "static":
            assert mod.input_scale is not None and mod.input_scale.item() == method.input_scales[name]
    in_memory = replace_with_w8a8(copy.deepcopy(model), qws, scheme, input_scales=method.input_scales)
    assert torch.equal(_logits(loaded), _logits(in_memory))  # bf16 artifact, bf16 compute: bit for bit
    a, b = _logits(ct_int8.load_w8a8(folder)[0]), _logits(ct_int8.load_w8a8(folder, cache=False)[0])
    assert torch.equal(a, b) and _rel(a, _logits(loaded)) < 0.02  # float32 loads: identical; close to bf16


def _ct_scheme(scheme):
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme

    preset = preset_name_to_scheme("W8A8", ["Linear"])
    if scheme is STATIC:
        preset.input_activations = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor",
                                                    dynamic=False)
    return preset


@pytest.mark.parametrize("label", ["dynamic", "static"])
def test_layout_matches_compressed_tensors(artifacts, tmp_path, label):
    """config validates with compressed-tensors' schema and equals its preset; its own ModelCompressor, given
    our model, scales and exact W_hat, writes the same tensors bit for bit (and the same config group).

    (W_hat is handed over in float32: a bfloat16 ``bf16(s * q)`` keeps only 8 significant bits, so dividing it
    by ``s`` can land one code away -- 126 for 127 -- as compressed-tensors would on a bf16 fake-quant model.)"""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    folder, model, qws, method = artifacts[label]
    cfg = json.loads((folder / "config.json").read_text())
    assert ct_int8.is_w8a8_artifact(cfg)
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    group, want = qc.config_groups["group_0"], _ct_scheme(DYN if label == "dynamic" else STATIC)
    assert group.weights == want.weights and group.input_activations == want.input_activations
    assert cfg["quantization_config"]["format"] == infer_module_format(torch.nn.Linear, group).value == "int-quantized"
    assert cfg["quantization_config"]["ignore"] == ["lm_head"]
    assert json.loads((folder / "provenance.json").read_text())["scheme"] == (DYN if label == "dynamic"
                                                                                   else STATIC).to_dict()
    theirs_model = copy.deepcopy(model)
    apply_quantization_config(theirs_model, QuantizationConfig(config_groups={"group_0": want}, ignore=["lm_head"]))
    for name, qw in qws.items():
        mod = theirs_model.get_submodule(name)
        mod.weight.data = qw.dequantize(torch.float32)  # s * q, exact in float32
        mod.weight_scale.data = qw.scales.clone()
        if label == "static":
            mod.input_scale.data = torch.tensor([method.input_scales[name]], dtype=torch.bfloat16)
    mc = ModelCompressor.from_pretrained_model(theirs_model)
    mc.compress_model(theirs_model)
    theirs_model.save_pretrained(tmp_path / "ct")
    mc.update_config(str(tmp_path / "ct"))
    ours, theirs = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert v.dtype == ours[k].dtype and torch.equal(v, ours[k]), k
    n = "model.layers.0.mlp.down_proj"
    assert ours[f"{n}.weight"].dtype == torch.int8 and ours[f"{n}.weight"].shape == (64, 128)
    assert ours[f"{n}.weight_scale"].dtype == torch.bfloat16 and ours[f"{n}.weight_scale"].shape == (64, 1)
    assert (f"{n}.input_scale" in ours) == (label == "static") and f"{n}.weight_zero_point" not in ours
    ct_cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert ct_cfg["config_groups"] == cfg["quantization_config"]["config_groups"]
    ct_loaded, _ = ct_int8.load_w8a8(tmp_path / "ct")  # their folder, our loader
    assert torch.equal(_logits(ct_loaded), _logits(ct_int8.load_w8a8(folder)[0]))


def _ct_grid(x, input_scale=None):
    """compressed-tensors' dynamic per-token int8 rule: s = absmax / 127.5, clamp [-128, 127]."""
    if input_scale is not None:
        return quantize_act_int8(x, input_scale)
    a = x.detach().float()
    s = a.abs().amax(-1, keepdim=True) / 127.5
    s = torch.where(s > 0, s, torch.full_like(s, torch.finfo(torch.float32).eps))
    return torch.round(a / s).clamp(-128, 127).to(torch.int8), s


@pytest.mark.parametrize("label", ["dynamic", "static"])
def test_transformers_loads_our_artifact(artifacts, monkeypatch, label):
    """The real client: transformers + compressed-tensors on CPU loads the folder (int8 weight, weight_scale,
    input_scale) and decompresses every weight to our W_hat exactly. Its modules keep compressed-tensors'
    quantized forward, which fake-quantizes the input activations: activation quantization IS applied on CPU.
    Static: the same rule as ours (x / input_scale, round, clamp [-128, 127]), logits equal ours to float32
    rounding. Dynamic: per token with s = absmax / 127.5 (vLLM and lowbit use absmax / 127): equal to ours run
    with that grid, and about one activation rounding away from ours."""
    pytest.importorskip("compressed_tensors")
    folder, _, qws, _ = artifacts[label]
    ours, _ = ct_int8.load_w8a8(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    b = _logits(theirs)
    for name, qw in qws.items():
        assert torch.equal(theirs.get_submodule(name).weight, qw.dequantize()), name
    mod = theirs.get_submodule("model.layers.0.mlp.down_proj")
    assert mod.quantization_scheme.input_activations.strategy == ("token" if label == "dynamic" else "tensor")
    a = _logits(ours)
    for m in theirs.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False
    weight_only = _logits(theirs)
    gap = (weight_only - b).abs().max()
    if label == "dynamic":
        monkeypatch.setattr(w8a8_linear, "quantize_act_int8", _ct_grid)
        same_grid = _logits(ours)
        assert (same_grid - b).abs().max() < gap / 100, ((same_grid - b).abs().max(), gap)
        # different grids: each side's logits are its weight-only logits (the same weights, exactly) plus its
        # own activation-rounding error, so |a - b| <= ours + theirs; and ours (steps absmax / 127) is
        # theirs (absmax / 127.5) in size: the grids are 0.4% apart, the rounding noise of each is s / sqrt(12)
        ours_gap = (a - weight_only).abs().max()
        assert (a - b).abs().max() <= ours_gap + gap + 1e-5
        # (measured 0.98 of theirs; a grid twice as coarse, e.g. absmax / 63, doubles it)
        assert 0.7 * gap < ours_gap < 1.4 * gap, (ours_gap, gap)
    else:
        assert (a - b).abs().max() < gap / 100, ((a - b).abs().max(), gap)


def test_format_errors_are_clear(artifacts, tmp_path):
    from lowbit.formats import compressed_tensors as ct

    folder, model, qws, method = artifacts["static"]
    with pytest.raises(FormatError, match="not a compressed-tensors int8 W8A8"):
        ct_int8.load_w8a8(folder.parent / "src")  # a plain model
    w4 = quantize_model(copy.deepcopy(model), QuantScheme(4, 32), progress=False)
    out = ct.save_quantized(model, w4, tmp_path / "int4")
    assert not ct_int8.is_w8a8_artifact(json.loads((out / "config.json").read_text()))
    assert not ct_int8.is_w8a8_artifact({})
    with pytest.raises(FormatError, match="int-quantized"):
        ct_int8.load_w8a8(out)
    with pytest.raises(FormatError, match="need an input scale for every linear"):
        ct_int8.save_w8a8(model, qws, tmp_path / "x", scheme=STATIC)
    with pytest.raises(FormatError, match="take no input_scales"):
        ct_int8.save_w8a8(model, qws, tmp_path / "x", scheme=DYN, input_scales=method.input_scales)
    with pytest.raises(FormatError, match="holds W8A8"):
        ct_int8.save_w8a8(model, w4, tmp_path / "x", scheme=PRESETS["W4A16"])
    with pytest.raises(FormatError, match="int8 symmetric per-channel"):
        ct_int8.save_w8a8(model, w4, tmp_path / "x", scheme=DYN)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = True
    with pytest.raises(FormatError, match="dynamic per-token or static per-tensor"):
        ct_int8.read_w8a8_scheme(cfg)
    with pytest.raises(SchemeError, match="--scheme W8A8 or W8A8_STATIC"):
        SmoothQuantMethod(PRESETS["W8A16"])
    with pytest.raises(SchemeError, match=r"alpha must lie in \[0, 1\]"):
        SmoothQuantMethod(DYN, alpha=2.0)
    assert not SmoothQuantMethod(DYN, alpha=None).needs_calibration
    assert SmoothQuantMethod(STATIC, alpha=None).needs_calibration


def test_cli_smoothquant_and_w8a8_rtn(tmp_path, capsys):
    import json as _json

    from lowbit.cli import main

    src = make_tiny_model_dir(tmp_path / "tiny-cli", "llama")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(80)))
    common = ["--no-progress", "quantize", str(src), "--calib", str(corpus), "--calib-samples", "4",
              "--calib-len", "32"]
    assert main([*common, "--scheme", "W8A8", "--method", "smoothquant", "--alpha", "0.6",
                 "-o", str(tmp_path / "sq")]) == 0
    record = _json.loads((tmp_path / "sq" / "provenance.json").read_text())
    assert record["methods"]["smoothquant"]["smoothed_groups"] > 0
    from lowbit.recipe import Recipe

    assert Recipe.from_file(tmp_path / "sq" / "recipe.yaml").method.alpha == 0.6
    assert main([*common, "--scheme", "W8A8_STATIC", "-o", str(tmp_path / "st")]) == 0
    res = tmp_path / "eval.json"
    assert main(["--no-progress", "eval", str(tmp_path / "sq"), "--reference", str(src), "--data", str(corpus),
                 "--ctx", "32", "--max-windows", "2", "--json", str(res)]) == 0
    got = _json.loads(res.read_text())["results"]["sq"]
    # the eval scores the W8A8 folder as lowbit's loader reads it (int8 activations and all), against the float
    # model, on the gptq protocol's windows (float32 log-softmax on both sides: ~1e-6 apart, tests/test_cli.py)
    from conftest import eval_windows, kld_top1

    windows = eval_windows(tmp_path / "sq", corpus.read_text(), 32, 2)
    kld, _ = kld_top1(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32),
                      ct_int8.load_w8a8(tmp_path / "sq")[0], windows)
    assert got["n_tokens"] == 2 * 31 and abs(got["kld_mean"] - kld) <= 2e-6, (got["kld_mean"], kld)
    for args, msg in [(["--scheme", "W4A16", "--method", "smoothquant"], "W8A8"),
                      (["--scheme", "W8A8", "--method", "gptq"], "smoothquant"),
                      (["--scheme", "W8A8", "--alpha", "0.5"], "--alpha")]:
        assert main([*common, *args, "-o", str(tmp_path / "bad")]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "bad").exists()
