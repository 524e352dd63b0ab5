"""AutoAWQ GEMM export: bit layout, round trip, config, and the real client (transformers + GPTQModel).

The real-client test runs transformers' AWQ path (which needs GPTQModel) in a subprocess: GPTQModel
patches safetensors and transformers when imported, which must not leak into the other tests.
It uses ``$LOWBIT_AWQ_PYTHON`` (default: this interpreter); see ``CLIENT_INSTALL`` for the install.
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.core.errors import FormatError
from lowbit.core.qlinear import QuantLinear
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.formats import awq_gemm as awq
from lowbit.pipeline.quantize import quantize_model

# --no-deps: GPTQModel 7.7 asks for torch>=2.14.1 and more, but its torch AWQ path runs on our pins
CLIENT_INSTALL = ("pip install --no-deps gptqmodel==7.7.0 pypcre==0.6.4 logbar==0.4.15 device-smi==0.5.7 "
                  "tokenicer==0.0.14 defuser==0.0.28 threadpoolctl==3.8.0 pillow==13.0.0")


def _quantized(tmp_path, scheme, arch="llama"):
    d = make_tiny_model_dir(tmp_path / f"src-{arch}", arch)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return d, model, quantize_model(model, scheme, "rtn", progress=False)


def _ids():
    return torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))


def _random_qw(out, inp, gs, sym=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    n = inp // gs
    zeros = torch.full((out, n), 8, dtype=torch.uint8) if sym else torch.randint(0, 16, (out, n), generator=g,
                                                                                  dtype=torch.uint8)
    scales = (torch.rand(out, n, generator=g) * 0.05 + 1e-3).to(torch.bfloat16)
    return QuantizedWeight(codes, scales, zeros, QuantScheme(4, gs, sym))


def _autoawq_pack(intweight):
    """AutoAWQ 0.2.9 ``WQLinear_GEMM.from_linear``'s packing loop, transcribed: ``(rows, cols)`` -> int32."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    x = intweight.to(torch.int32)
    q = torch.zeros((x.shape[0], x.shape[1] // 8), dtype=torch.int32)
    for col in range(x.shape[1] // 8):
        for i in range(8):
            q[:, col] |= x[:, col * 8 + order_map[i]] << (i * 4)
    return q


def test_known_answer_word():
    """Output columns 0..7 holding codes 0..7 pack to 0x75316420 (nibble i = column [0,2,4,6,1,3,5,7][i])."""
    codes = torch.arange(8, dtype=torch.uint8).repeat(32, 1).t().contiguous()  # (out 8, in 32): row r = r
    qw = QuantizedWeight(codes, torch.ones(8, 1), torch.full((8, 1), 15, dtype=torch.uint8), QuantScheme(4, 32, False))
    t = awq.pack_awq(qw)
    assert t["qweight"].shape == (32, 1) and t["qweight"].dtype == torch.int32
    assert (t["qweight"] == 0x75316420).all()
    assert t["qzeros"].tolist() == [[-1]]  # zeros 15 everywhere: 0xFFFFFFFF
    assert t["scales"].shape == (1, 8) and t["scales"].dtype == torch.float16


@pytest.mark.parametrize("out,inp,gs", [(8, 32, 32), (64, 128, 32), (64, 128, 64), (24, 256, 128), (256, 512, 128),
                                        (128, 384, 64)])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_pack_is_autoawq_layout_and_unpack_is_exact(out, inp, gs, sym):
    qw = _random_qw(out, inp, gs, sym, seed=out + inp + gs)
    t = awq.pack_awq(qw)
    assert t["qweight"].shape == (inp, out // 8) and t["qzeros"].shape == (inp // gs, out // 8)
    assert t["scales"].shape == (inp // gs, out) and t["scales"].dtype == torch.float16
    assert torch.equal(t["qweight"], _autoawq_pack(qw.codes.t()))
    assert torch.equal(t["qzeros"], _autoawq_pack(qw.zeros.t()))
    back = awq.unpack_awq(t, gs, symmetric=sym)
    assert back.scheme == QuantScheme(4, gs, sym)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales.float(), qw.scales.float())  # bf16 in fp16's normal range: exact
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert awq.unpack_awq(t).scheme.group_size == gs  # group size from the shapes
    assert awq.unpack_awq(t, symmetric=True).scheme.symmetric is sym  # claimed symmetric only if every zero is 8


def test_save_load_round_trip_logits_equal(tmp_path):
    _, model, qws = _quantized(tmp_path, QuantScheme(4, 32, False))
    out = awq.save_awq_gemm(model, qws, tmp_path / "out32", dtype=torch.float32)
    loaded, scheme = awq.load_awq_gemm(out)
    assert scheme == QuantScheme(4, 32, False)
    for name, qw in qws.items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, QuantLinear) and mod.weight_scale.dtype == torch.float16
        back = mod.qweight()
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
        assert torch.equal(back.scales.float(), qw.scales.float())
    with torch.inference_mode():
        ref = model(_ids()).logits
        assert torch.allclose(loaded(_ids()).logits, ref, atol=1e-5)
        # the default fp16 folder: only the unquantized tensors (embeddings, norms) are rounded
        half, _ = awq.load_awq_gemm(awq.save_awq_gemm(model, qws, tmp_path / "out16"))
        assert torch.allclose(half(_ids()).logits, ref, atol=2e-3)


def test_folder_layout_and_config(tmp_path):
    from transformers import AutoTokenizer, AwqConfig

    d, model, qws = _quantized(tmp_path, QuantScheme(4, 32, False, name="W4A16_ASYM"))
    out = awq.save_awq_gemm(model, qws, tmp_path / "out", tokenizer=AutoTokenizer.from_pretrained(d))
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    assert cfg["dtype"] == "float16" and awq.is_awq_artifact(cfg)
    theirs = AwqConfig.from_dict(qc)  # transformers' own reading of the block
    assert (theirs.bits, theirs.group_size, theirs.zero_point, theirs.format) == (4, 32, True, "gemm")
    t = load_file(str(out / "model.safetensors"))
    n = "model.layers.0.mlp.down_proj"  # W (64, 128)
    assert t[f"{n}.qweight"].shape == (128, 8) and t[f"{n}.qweight"].dtype == torch.int32
    assert t[f"{n}.qzeros"].shape == (4, 8) and t[f"{n}.qzeros"].dtype == torch.int32
    assert t[f"{n}.scales"].shape == (4, 64) and t[f"{n}.scales"].dtype == torch.float16
    assert f"{n}.weight" not in t and t["model.embed_tokens.weight"].dtype == torch.float16
    recipe = json.loads((out / "provenance.json").read_text())
    assert recipe["scheme"]["bits"] == 4 and recipe["format"] == "awq-gemm"
    assert (out / "tokenizer.json").is_file()


def test_symmetric_is_written_with_zero_point_8(tmp_path):
    _, model, qws = _quantized(tmp_path, QuantScheme(4, 32, True))
    out = awq.save_awq_gemm(model, qws, tmp_path / "out", dtype=torch.float32)
    t = load_file(str(out / "model.safetensors"))
    assert (t["model.layers.0.mlp.down_proj.qzeros"] == torch.tensor(0x88888888).to(torch.int32)).all()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["zero_point"] is True
    loaded, scheme = awq.load_awq_gemm(out)
    assert scheme == QuantScheme(4, 32, True)
    with torch.inference_mode():
        assert torch.allclose(loaded(_ids()).logits, model(_ids()).logits, atol=1e-5)


@pytest.mark.parametrize("scheme", [QuantScheme(3, 32, False), QuantScheme(8, None, False), QuantScheme(2, 64, False),
                                    QuantScheme(4, None, False)], ids=lambda s: s.label.replace(" ", "-"))
def test_unsupported_schemes_are_refused(tmp_path, scheme):
    _, model, qws = _quantized(tmp_path, scheme)
    with pytest.raises(FormatError, match="W4A16_ASYM"):
        awq.save_awq_gemm(model, qws, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_g_idx_mixed_groups_and_odd_widths_are_refused():
    qw = _random_qw(16, 64, 32)
    act = QuantizedWeight(qw.codes, qw.scales, qw.zeros, qw.scheme, g_idx=torch.arange(64, dtype=torch.int32) % 2)
    with pytest.raises(FormatError, match="g_idx"):
        awq.pack_awq(act)
    odd = _random_qw(12, 64, 32)
    with pytest.raises(FormatError, match="multiple of 8"):
        awq.pack_awq(odd)
    model = torch.nn.Module()
    model.a, model.b = torch.nn.Linear(64, 16), torch.nn.Linear(64, 16)
    with pytest.raises(FormatError, match="one group size"):
        awq.save_awq_gemm(model, {"a": qw, "b": _random_qw(16, 64, 64)}, "/nonexistent/never")


def test_fp16_scales_rounding_warns_and_overflow_is_refused(caplog):
    qw = _random_qw(8, 64, 32)
    tiny = qw.scales.clone()
    tiny[0, 0] = 1.2345e-7  # a bf16 value fp16 holds only as a subnormal: rounded
    with caplog.at_level(logging.WARNING, logger="lowbit.formats.awq_gemm"):
        t = awq.pack_awq(QuantizedWeight(qw.codes, tiny, qw.zeros, qw.scheme))
    assert "not exact in fp16" in caplog.text
    back = awq.unpack_awq(t)  # what the folder encodes is what our loader rebuilds
    assert torch.equal(back.scales, tiny.to(torch.float16))
    huge = qw.scales.clone()
    huge[1, 1] = 1e5
    with pytest.raises(FormatError, match="fp16's range"):
        awq.pack_awq(QuantizedWeight(qw.codes, huge, qw.zeros, qw.scheme))


def test_loader_refuses_other_artifacts(tmp_path):
    _, model, qws = _quantized(tmp_path, QuantScheme(4, 32, False))
    out = awq.save_awq_gemm(model, qws, tmp_path / "out")
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for change, match in [({"version": "gemv"}, "'gemv' is not supported"), ({"bits": 8}, "8-bit AWQ"),
                          ({"quant_method": "gptq"}, "no AWQ quantization_config")]:
        cfg_file.write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"], **change}}))
        with pytest.raises(FormatError, match=match):
            awq.load_awq_gemm(out)
    assert not awq.is_awq_artifact({"quantization_config": {"quant_method": "compressed-tensors"}})
    assert not awq.is_awq_artifact({}) and awq.is_awq_artifact({"quantization_config": {"quant_method": "AWQ"}})
    with pytest.raises(FormatError, match="inconsistent"):
        awq.unpack_awq({"qweight": torch.zeros(64, 2, dtype=torch.int32)})


# Runs in the client's interpreter: transformers' AWQ path with GPTQModel's pure-torch kernel
# (AwqTorchLinear: GPTQModel's dense dequantize + matmul reference; the default CPU kernel first
# JIT-compiles a C++ extension for minutes). Writes, per folder, its logits and per AWQ layer
# GPTQModel's own unpacking, repacking and dequantization of the tensors it loaded.
CLIENT = r"""
import json, sys
try:
    import gptqmodel
except ImportError as e:
    print(f"gptqmodel is not importable: {e}")
    sys.exit(77)
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AwqConfig
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm, pack_awq, reverse_awq_order, unpack_awq
ids = torch.tensor([[int(i) for i in sys.argv[1].split(",")]])
report = []
for folder, dest in zip(sys.argv[2::2], sys.argv[3::2]):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16,
                                                 quantization_config=AwqConfig(backend="torch_awq"))
    out, kernels = {}, set()
    with torch.inference_mode():
        out["logits"] = model(ids).logits.float().contiguous()
    for name, m in model.named_modules():
        if not hasattr(m, "qzeros"):
            continue
        kernels.add(type(m).__name__)
        iw, iz = reverse_awq_order(*unpack_awq(m.qweight, m.qzeros, 4), 4)
        iw, iz = iw & 15, iz & 15
        qw2, qz2 = pack_awq(iw, iz, 4)
        out[name + ".codes"], out[name + ".zeros"] = iw.to(torch.uint8), iz.to(torch.uint8)
        out[name + ".repacked"] = torch.tensor([torch.equal(qw2, m.qweight) and torch.equal(qz2, m.qzeros)])
        out[name + ".w16"] = dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, m.group_size).contiguous()
        out[name + ".w32"] = dequantize_gemm(m.qweight, m.qzeros, m.scales.float(), 4, m.group_size).contiguous()
    save_file(out, dest)
    report.append({"kernels": sorted(kernels), "version": gptqmodel.__version__})
print("REPORT " + json.dumps(report))
"""


def test_real_client_transformers_gptqmodel(tmp_path):
    """transformers 5 (+ GPTQModel's AWQ kernel) loads our folders; its decoding equals ours bit for bit."""
    python = os.environ.get("LOWBIT_AWQ_PYTHON", sys.executable)
    cases = {}
    for scheme, arch in [(QuantScheme(4, 32, False), "qwen2"), (QuantScheme(4, 64, True), "llama")]:
        _, model, qws = _quantized(tmp_path / arch, scheme, arch)
        cases[arch] = (awq.save_awq_gemm(model, qws, tmp_path / arch / "awq"), qws)
    ids = _ids()
    args = [str(a) for arch, (folder, _) in cases.items() for a in (folder, tmp_path / f"{arch}.safetensors")]
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
    r = subprocess.run([python, "-c", CLIENT, ",".join(map(str, ids[0].tolist())), *args], capture_output=True,
                       text=True, env=env, timeout=600)
    if r.returncode == 77:
        pytest.skip(f"real AWQ client unavailable in {python}: {r.stdout.strip()}; install it with "
                    f"`{CLIENT_INSTALL}` (or point LOWBIT_AWQ_PYTHON at an interpreter that has it)")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.rsplit("REPORT ", 1)[1])
    for (arch, (folder, qws)), rep in zip(cases.items(), report, strict=True):
        assert rep["kernels"] == ["AwqTorchLinear"], rep
        theirs = load_file(str(tmp_path / f"{arch}.safetensors"))
        ours16, _ = awq.load_awq_gemm(folder, dtype=torch.float16)
        ours32, _ = awq.load_awq_gemm(folder)
        assert {k.rsplit(".", 1)[0] for k in theirs if k.endswith(".w16")} == set(qws)
        for name, qw in qws.items():
            assert bool(theirs[f"{name}.repacked"]), name  # their packer writes our words
            assert torch.equal(theirs[f"{name}.codes"].t(), qw.codes), name
            assert torch.equal(theirs[f"{name}.zeros"].t(), qw.zeros), name
            mod = ours16.get_submodule(name)
            assert torch.equal(theirs[f"{name}.w16"].t(), mod.dequantized_weight(torch.float16)), name
            assert torch.equal(theirs[f"{name}.w32"].t(), mod.dequantized_weight(torch.float32)), name
            assert torch.equal(theirs[f"{name}.w32"].t(), qw.dequantize()), name  # bf16 scales exact in fp16
        with torch.inference_mode():
            a16, a32 = ours16(ids).logits.float(), ours32(ids).logits
        b = theirs["logits"]
        # same fp16 weights; fp16 GEMMs with the weight in another layout: measured 0 and 1 fp16 ulp (2.4e-4) apart
        assert torch.allclose(a16, b, atol=1e-3, rtol=0), (arch, (a16 - b).abs().max())
        assert torch.allclose(a32, b, atol=2e-3, rtol=0), (arch, (a32 - b).abs().max())
