import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.core.errors import FormatError, LowbitError
from lowbit.core.qlinear import QuantLinear
from lowbit.core.scheme import QuantScheme
from lowbit.formats import compressed_tensors as ct
from lowbit.formats import hf_folder
from lowbit.pipeline.quantize import quantize_model

SCHEMES = [QuantScheme(4, 32), QuantScheme(4, 32, False), QuantScheme(3, 32), QuantScheme(8, None),
           QuantScheme(2, 64, False)]


def _quantized(tmp_path, scheme, arch="llama"):
    d = make_tiny_model_dir(tmp_path / f"src-{arch}", arch)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    qws = quantize_model(model, scheme, "rtn", progress=False, scale_dtype=torch.bfloat16)
    return d, model, qws


def _ids():
    return torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label.replace(" ", "-"))
def test_round_trip_is_exact(tmp_path, scheme):
    """Codes, scales and zeros come back bit for bit; our loader's logits equal the in-memory model's."""
    _, model, qws = _quantized(tmp_path, scheme)
    out = ct.save_quantized(model, qws, tmp_path / "out", dtype=torch.float32)
    loaded, got_scheme = ct.load_quantized(out)
    assert got_scheme == scheme.with_options(name=None)
    for name, qw in qws.items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, QuantLinear)
        back = mod.qweight()
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
        assert torch.equal(back.scales.float(), qw.scales.float())
    with torch.inference_mode():
        assert torch.allclose(loaded(_ids()).logits, model(_ids()).logits, atol=1e-5)


def test_layout_matches_compressed_tensors_spec(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    d, model, qws = _quantized(tmp_path, QuantScheme(4, 32, False))
    out = ct.save_quantized(model, qws, tmp_path / "out", tokenizer=AutoTokenizer.from_pretrained(d))
    cfg = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])  # their own schema
    w = qc.config_groups["group_0"].weights
    assert (w.num_bits, w.group_size, w.symmetric, w.strategy) == (4, 32, False, "group")
    assert cfg["quantization_config"]["ignore"] == ["lm_head"]
    t = load_file(str(out / "model.safetensors"))
    n = "model.layers.0.mlp.down_proj"
    assert t[f"{n}.weight_packed"].shape == (64, 128 * 4 // 32) and t[f"{n}.weight_packed"].dtype == torch.int32
    assert t[f"{n}.weight_scale"].shape == (64, 4) and t[f"{n}.weight_scale"].dtype == torch.bfloat16
    assert t[f"{n}.weight_zero_point"].shape == (64 * 4 // 32, 4)
    assert t[f"{n}.weight_shape"].tolist() == [64, 128]
    assert f"{n}.weight" not in t
    recipe = json.loads((out / ct.RECORD_FILE).read_text())
    assert recipe["scheme"]["bits"] == 4
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(3, 32), QuantScheme(8, None)],
                         ids=lambda s: s.label.replace(" ", "-"))
def test_transformers_loads_our_artifact(tmp_path, scheme):
    """The real client: transformers + compressed-tensors reads the folder; logits equal ours."""
    pytest.importorskip("compressed_tensors")
    _, model, qws = _quantized(tmp_path, scheme)
    out = ct.save_quantized(model, qws, tmp_path / "out")
    ours, _ = ct.load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.inference_mode():
        a, b = ours(_ids()).logits, theirs(_ids()).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_transformers_loads_asymmetric_artifact(tmp_path):
    """Asymmetric (packed zero points): loaded through compressed-tensors' dequantizing path.

    transformers 5.x + compressed-tensors 0.20 cannot build the *compressed* module for asymmetric
    pack-quantized weights (their meta-device path leaves the zero point unpacked), so the test
    uses ``dequantize=True``, which decompresses our tensors with compressed-tensors' own code.
    """
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    _, model, qws = _quantized(tmp_path, QuantScheme(4, 32, False), arch="qwen2")
    out = ct.save_quantized(model, qws, tmp_path / "out")
    ours, _ = ct.load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, qw in qws.items():  # their decompressed weight is s (q - z) formed in the scales' dtype (bf16):
        # ours rounded to bf16, bit for bit (the float32 product of a bf16 scale and a small integer is exact)
        want = qw.dequantize(torch.float32).to(torch.bfloat16).float()
        assert torch.equal(theirs.get_submodule(name).weight.float(), want), name
    with torch.inference_mode():
        a, b = ours(_ids()).logits, theirs(_ids()).logits
    # weights <= 2^-9 relative apart (that rounding): logits move by about that fraction of their size;
    # bound 2^-7 of the largest logit (one code off by a step would already fail the weights above)
    assert (a - b).abs().max() <= 2**-7 * a.abs().max(), ((a - b).abs().max(), a.abs().max())


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    _, model, qws = _quantized(tmp_path, QuantScheme(4, 32))
    out = tmp_path / "out"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_folder, "save_file", boom)
    with pytest.raises(OSError):
        ct.save_quantized(model, qws, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_existing_output_refused_without_overwrite(tmp_path):
    _, model, qws = _quantized(tmp_path, QuantScheme(4, 32))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LowbitError, match="not empty"):
        ct.save_quantized(model, qws, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(LowbitError, match="not a lowbit artifact"):  # --force replaces only our artifacts
        ct.save_quantized(model, qws, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    art = ct.save_quantized(model, qws, tmp_path / "art")
    (art / "stale.txt").write_text("from an earlier run")
    ct.save_quantized(model, qws, art, overwrite=True)
    assert not (art / "stale.txt").exists() and (art / "config.json").is_file()


def test_corrupt_artifact_is_a_clear_error(tmp_path):
    _, model, qws = _quantized(tmp_path, QuantScheme(4, 32))
    out = ct.save_quantized(model, qws, tmp_path / "out")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(FormatError, match="corrupt or truncated"):
        ct.load_quantized(out)
    with pytest.raises(FormatError, match="no config.json"):
        ct.load_quantized(tmp_path)
