"""NF4/FP4 and LLM.int8: numerics bit-identical to bitsandbytes, runtime parity, real-client round trips."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.cli import main
from lowbit.core.bnb_linear import Linear4bit, LLMInt8Linear, int8_activations
from lowbit.core.codebooks import code4, dynamic_map
from lowbit.core.dtypes import DataTypeScheme, get_dt_scheme
from lowbit.core.errors import SchemeError
from lowbit.formats.bitsandbytes import OUTLIER_FILE, load_bnb, save_bnb
from lowbit.methods.llm_int8 import quantize_int8
from lowbit.methods.nf4 import quantize_4bit, quantize_blockwise_8bit
from lowbit.pipeline.datatypes import DataTypeMethod
from lowbit.pipeline.quantize import quantize_model

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a dev dependency (pip install -e .[dev])")

INT8 = get_dt_scheme("INT8-LLM")


def test_code_books_equal_bitsandbytes():
    assert torch.equal(code4("nf4"), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code4("fp4"), bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_4bit_bit_identical_to_bitsandbytes(kind, double_quant, block, dtype):
    g = torch.Generator().manual_seed(block + double_quant)
    w = (torch.randn(96, 256, generator=g) * 0.02).to(dtype)
    w[3, 5], w[7, :64] = 0.7, 0.0  # an outlier and an all-zero block
    packed, state = bnbf.quantize_4bit(w, blocksize=block, compress_statistics=double_quant, quant_type=kind)
    qw = quantize_4bit(w, DataTypeScheme(kind, block, double_quant))
    assert torch.equal(qw.packed(), packed)
    if double_quant:
        assert torch.equal(qw.qabsmax, state.absmax) and torch.equal(qw.absmax2, state.state2.absmax)
        assert qw.offset.item() == state.offset.item()
    else:
        assert torch.equal(qw.absmax, state.absmax)
    assert torch.equal(qw.dequantize(dtype), bnbf.dequantize_4bit(packed, state))
    assert torch.equal(type(qw).unpack(packed, qw.shape), qw.codes)


def test_4bit_rows_not_multiple_of_block_follow_bitsandbytes_reference_kernel():
    """Blocks run over the flattened weight. bitsandbytes' own CPU dequantize kernel gets rows whose
    length is not a multiple of the block wrong (it assumes whole blocks per row); its pure-PyTorch
    reference kernel, which we follow, does not."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(3)) * 0.02
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    qw = quantize_4bit(w, DataTypeScheme("nf4", 64))
    assert torch.equal(qw.packed(), packed)
    ref = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, state.code, 64, state.shape, torch.float32)
    assert torch.equal(qw.dequantize(), ref)
    assert (qw.dequantize() - w).abs().max() <= 0.153 * w.abs().max()  # half the widest NF4 gap (-1 .. -0.696)


def test_8bit_blockwise_equals_bitsandbytes_cpu_kernel():
    g = torch.Generator().manual_seed(0)
    for n in (100, 256, 1000, 5003):
        x = torch.randn(n, generator=g) * 0.05 + 0.001
        x[:10] = 0 if n == 256 else x[:10]
        q, a = torch.ops.bitsandbytes.quantize_blockwise.default(x, bnbf.create_dynamic_map(signed=True), 256)
        q2, a2 = quantize_blockwise_8bit(x, dynamic_map(), 256)
        assert torch.equal(q, q2) and torch.equal(a, a2)


def test_scheme_validation():
    with pytest.raises(SchemeError, match="one of"):
        DataTypeScheme("nf4", 48)
    with pytest.raises(SchemeError, match="double quantization"):
        DataTypeScheme("fp8_e4m3", None, double_quant=True)
    with pytest.raises(SchemeError, match="row-wise"):
        DataTypeScheme("int8", 64, activations="int8-outlier")
    assert get_dt_scheme("nf4", block_size=128, double_quant=True).label == "NF4 b128 +DQ"


def _planted(t=24, n=256, cols=(3, 77), scale=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g)
    x[:, list(cols)] *= scale  # LLM.int8's systematic outlier features
    return x


def test_int8_weights_and_matmul_equal_bitsandbytes():
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.05
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    ours = quantize_int8(w, INT8)
    assert torch.equal(ours.CB, cb) and torch.equal(ours.SCB, scb)
    x = _planted()
    state = bnb.MatmulLtState()
    state.CB, state.SCB, state.threshold, state.has_fp16_weights = cb, scb, 6.0, False
    state.is_training = False  # the inference path (MatMul8bitLt), as Linear8bitLt.eval() runs it
    with torch.inference_mode():
        ref = bnb.matmul(x, torch.empty(0), state=state)
        got = LLMInt8Linear(ours)(x)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)


def test_int8_outlier_split_and_calibrated_columns():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g) * 0.05
    x = _planted()
    exact = x @ w.t()
    ca, sca, cols = int8_activations(x.to(torch.float16), 6.0)
    assert set(cols.tolist()) >= {3, 77} and torch.all(ca[:, cols] == 0)
    dyn = LLMInt8Linear(quantize_int8(w, INT8))(x)
    cal = LLMInt8Linear(quantize_int8(w, INT8, act_absmax=x.abs().amax(0)))(x)
    no_split = LLMInt8Linear(quantize_int8(w, INT8.with_options(threshold=1e6)))(x)
    err = {k: ((v - exact).norm() / exact.norm()).item() for k, v in
           {"dyn": dyn, "cal": cal, "none": no_split}.items()}
    assert err["cal"] <= err["dyn"] < err["none"] / 3, err  # the split is what saves LLM.int8
    assert err["dyn"] < 0.02, err


def _bf16_model_dir(tmp_path):
    d = make_tiny_model_dir(tmp_path / "tiny", "llama")
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    out = tmp_path / "tiny-bf16"
    m.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(d).save_pretrained(out)
    return out


def _ids():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,dq", [("NF4", False), ("NF4", True), ("FP4", False)])
def test_4bit_folder_equals_transformers_bitsandbytes_and_loads_there(tmp_path, name, dq):
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig

    src = _bf16_model_dir(tmp_path)
    scheme = get_dt_scheme(name, double_quant=dq)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    weights = quantize_model(model, None, DataTypeMethod(scheme, scale_dtype=torch.bfloat16), progress=False)
    out = save_bnb(model, weights, tmp_path / "ours", scheme=scheme, dtype=torch.bfloat16)
    # bitsandbytes' own quantization of the same bf16 checkpoint, saved by transformers
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme.dtype, bnb_4bit_use_double_quant=dq,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.bfloat16)
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "theirs" / "model.safetensors"))
    quant_keys = [k for k in b if ".weight." in k or k.endswith("proj.weight")]
    assert len(quant_keys) >= 14 * 4  # packed weight, absmax, quant_map, quant_state (+ nested)
    for k in quant_keys:
        assert k in a and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the real client loads our folder (in bf16, the checkpoint's dtype, whatever dtype is asked)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    mine, got = load_bnb(out, dtype=torch.bfloat16)
    assert got == scheme.with_options(name=None)
    assert isinstance(mine.get_submodule("model.layers.0.mlp.down_proj"), Linear4bit)
    with torch.inference_mode():
        fused = ref(_ids()).logits.float()  # bitsandbytes' AVX512-BF16 CPU kernel (bf16 dot products)
        for m in ref.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        ref_dq = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        for m in ref_dq.modules():  # its dequantize + matmul path: same numerics as ours, to the bit
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        ours = mine(_ids()).logits.float()
        assert torch.equal(ours, ref_dq(_ids()).logits.float())
        assert (ours - fused).abs().max() < 0.02 * ours.abs().max()
        mine32, _ = load_bnb(out, dtype=torch.float32)
        assert torch.allclose(mine32(_ids()).logits, model(_ids()).logits, rtol=0, atol=1e-4)


def test_int8_folder_loads_in_transformers_and_matches(tmp_path):
    src = _bf16_model_dir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():  # plant an outlier feature: one channel of the attention norm is huge
        model.model.layers[1].input_layernorm.weight[5] = 60.0
    tokens = _ids()
    method = DataTypeMethod(INT8, scale_dtype=torch.bfloat16)
    weights = quantize_model(model, None, method, tokens=tokens, progress=False)
    assert method.outlier_columns["model.layers.1.self_attn.q_proj"] >= 1
    out = save_bnb(model, weights, tmp_path / "int8", scheme=INT8, dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["load_in_8bit"] and cfg["llm_int8_threshold"] == 6.0
    mine, _ = load_bnb(out)
    assert isinstance(mine.get_submodule("model.layers.1.self_attn.q_proj"), LLMInt8Linear)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()  # transformers: bf16 anyway
    (out / OUTLIER_FILE).unlink()  # transformers ignores lowbit's calibrated columns: compare like with like
    plain, _ = load_bnb(out)
    plain16, _ = load_bnb(out, dtype=torch.bfloat16)
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        float_model.model.layers[1].input_layernorm.weight[5] = 60.0
    with torch.inference_mode():
        exact = float_model(tokens).logits
        assert torch.equal(plain16(tokens).logits, ref(tokens).logits)
        e_cal = (mine(tokens).logits - exact).abs().mean()
        e_plain = (plain(tokens).logits - exact).abs().mean()
    # the planted channel is an outlier in every token: the calibrated columns keep it in 16 bits wherever it
    # feeds a linear, the runtime threshold only where |x| > 6 (measured 0.79 of the plain error)
    assert e_cal < e_plain, (float(e_cal), float(e_plain))


def test_cli_nf4_quantize_eval_and_errors(tmp_path, capsys):
    src = _bf16_model_dir(tmp_path)
    out = tmp_path / "nf4"
    assert main(["--no-progress", "quantize", str(src), "--scheme", "NF4", "--double-quant", "-o", str(out)]) == 0
    assert "14 linears" in capsys.readouterr().out
    assert json.loads((out / "provenance.json").read_text())["scheme"]["double_quant"] is True
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join("the quick brown fox jumps over the lazy dog" for _ in range(60)))
    res = tmp_path / "eval.json"
    assert main(["--no-progress", "eval", str(out), "--reference", str(src), "--data", str(corpus),
                 "--ctx", "32", "--max-windows", "2", "--json", str(res)]) == 0
    assert "nf4" in capsys.readouterr().out
    got = json.loads(res.read_text())["results"]["nf4"]
    # the eval scores the NF4 folder as lowbit's loader reads it against the bf16 source model, on the gptq
    # protocol's windows (log-softmax of the same logits on both sides: ~1e-6 apart, tests/test_cli.py)
    from conftest import eval_windows, kld_top1

    kld, _ = kld_top1(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), load_bnb(out)[0],
                      eval_windows(out, corpus.read_text(), 32, 2))
    assert got["n_tokens"] == 2 * 31 and abs(got["kld_mean"] - kld) <= 2e-6, (got["kld_mean"], kld)
    for args, msg in [(["--scheme", "NF4", "--method", "gptq"], "does not apply"),
                      (["--scheme", "NF4", "--group-size", "48"], "one of"),
                      (["--scheme", "W4A16", "--double-quant"], "data-type schemes")]:
        bad = tmp_path / "bad"
        assert main(["--no-progress", "quantize", str(src), *args, "-o", str(bad)]) == 2
        assert msg in capsys.readouterr().err and not bad.exists()
