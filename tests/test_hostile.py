"""Hostile input: every crash ``bench/fuzz.py`` found, rebuilt by hand, ends in lowbit's own error, fast and
without a large allocation; and a short seeded fuzz run per reader finds nothing else.

Found by the fuzzer before the fixes (the exception that escaped): GGUF imatrix headers (IndexError,
ValueError, UnicodeDecodeError from gguf-py's reader; a 5.7 s read), a zero-by-2^63 tensor (numpy's
"maximum allowed dimension exceeded"), recipes nested 100 000 deep (libyaml segfaulted), YAML alias
bombs (a hang), 15 000-digit integers (ValueError), an llm-compressor recipe with ``targets:`` empty
(TypeError), artifact configs with an unknown model type, a misspelt dtype or sizes the weights do not
hold (ValueError, AttributeError, RuntimeError, a 180 MB allocation).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.core.errors import LowbitError, ModelLoadError, RecipeError
from lowbit.formats.gguf.imatrix import load_imatrix
from lowbit.models.gguf_header import read_header
from lowbit.models.loader import check_gguf, check_safetensors
from lowbit.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parents[1]


def _gguf(kvs: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_t: int = 0, version: int = 3,
          data: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv) + kvs + tensors
    return head + b"\0" * (-len(head) % 32) + data


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _tensor(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", ggml_type, offset)


def _timed(fn, *a):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    try:
        fn(*a)
    finally:
        assert time.perf_counter() - t < 2.0  # bounded work: a crafted count must not drive a long loop


# -- imatrix --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blob, says", [
    # 24 bytes, one entry whose value count is negative (np.frombuffer(count=-1) read the rest of the file)
    (struct.pack("<iI3siii", 1, 3, b"abc", 1, -1, 0), "value count -1"),
    (struct.pack("<i", 0x7FFFFFFF) + b"\0" * 20, "entry count"),  # a huge count: looped for an hour
    (struct.pack("<ii", 1, 0x7FFFFFF0) + b"\0" * 16, "name length"),
    (struct.pack("<iI1sii", 1, 1, b"a", -5, 1) + struct.pack("<f", 1.0), "negative call count"),
    (struct.pack("<iI1sii", 1, 1, b"a", 1, 1) + struct.pack("<f", float("nan")), "NaN"),
])
def test_legacy_imatrix_bounds(tmp_path, blob, says):
    p = tmp_path / "im.dat"
    p.write_bytes(blob)
    with pytest.raises(LowbitError, match=says):
        _timed(load_imatrix, p)


@pytest.mark.parametrize("blob", [
    _gguf(tensors=_tensor("a.in_sum2", [2**63 + 8, 0]), n_t=1),  # numpy: maximum allowed dimension exceeded
    _gguf(tensors=_tensor("a.in_sum2", [4], ggml_type=1), n_t=1, data=b"\0" * 8),  # F16: not an imatrix type
    _gguf(tensors=_tensor("a.in_sum2", [4]) + _tensor("a.counts", [1], offset=32), n_t=2,
          data=struct.pack("<4f", 1, 2, 3, -4) + b"\0" * 16 + struct.pack("<f", 1)),  # a negative sum
    _gguf(kvs=_s("imatrix.chunk_count") + struct.pack("<I", 8) + _s("x"), n_kv=1),  # a string as a count
    _gguf(tensors=_tensor("a.in_sum2", [4]), n_t=1, data=struct.pack("<4f", 1, 2, 3, 4)),  # sums without counts
])
def test_gguf_imatrix_bounds(tmp_path, blob):
    p = tmp_path / "im.gguf"
    p.write_bytes(blob)
    with pytest.raises(LowbitError):
        _timed(load_imatrix, p)


# -- GGUF headers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blob, says", [
    (_gguf(version=318767107), "version"),
    (_gguf(n_kv=2**60), "key-value pairs"),
    (_gguf(kvs=_s(b"\xf1key") + struct.pack("<I", 4) + struct.pack("<I", 1), n_kv=1), "UTF-8"),
    (_gguf(kvs=_s("k") + struct.pack("<I", 13), n_kv=1), "unknown value type"),
    (_gguf(kvs=_s("k") + struct.pack("<IIQ", 9, 8, 2**62), n_kv=1), "elements"),
    (_gguf(kvs=_s("k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 0), n_kv=1), "array of type 9"),
    (_gguf(tensors=_tensor("t", [1, 1, 1, 1, 1]), n_t=1), "5 dimensions"),
    (_gguf(tensors=_tensor("t", [4], ggml_type=99), n_t=1), "unknown ggml type"),
    (_gguf(tensors=_tensor("t", [31], ggml_type=8), n_t=1, data=b"\0" * 34), "does not fit type"),
    (_gguf(tensors=_tensor("t", [4]) + _tensor("t", [4]), n_t=2, data=b"\0" * 16), "twice"),
    (_gguf(tensors=_tensor("t", [4], offset=7), n_t=1, data=b"\0" * 64), "unaligned"),
    (_gguf(tensors=_tensor("t", [1024]), n_t=1, data=b"\0" * 16), "truncated"),
    (_gguf(kvs=_s("general.alignment") + struct.pack("<II", 4, 3), n_kv=1), "power of two"),
])
def test_gguf_header_bounds(tmp_path, blob, says):
    p = tmp_path / "m.gguf"
    p.write_bytes(blob)
    with pytest.raises(ModelLoadError, match=says):
        _timed(check_gguf, p)


def test_gguf_header_reads_what_gguf_py_writes(tmp_path):
    import gguf
    import numpy as np

    p = tmp_path / "ok.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_token_list(["a", "b"])
    w.add_array("x.ints", [1, 2, 3])
    w.add_float32("x.f", 0.5)
    w.add_tensor("w", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("q", gguf.quants.quantize(np.ones((2, 32), np.float32), gguf.GGMLQuantizationType.Q4_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_header(p)
    ref = gguf.GGUFReader(str(p))
    assert h.fields["tokenizer.ggml.tokens"] == ["a", "b"] and h.fields["x.ints"] == [1, 2, 3]
    assert h.fields["x.f"] == 0.5 and h.fields["general.architecture"] == "llama"
    assert [(t.name, t.offset, t.nbytes) for t in h.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes)) for t in ref.tensors]


# -- safetensors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header, data", [
    ([1, 2], b""),
    ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),  # a hole
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b""),
    ({"__metadata__": {"k": 1}}, b""),
])
def test_safetensors_header_bounds(tmp_path, header, data):
    raw = json.dumps(header).encode()
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    with pytest.raises(ModelLoadError):
        check_safetensors(p)


# -- recipes --------------------------------------------------------------------------------------------------------
ALIAS_BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]) + "\nscheme: *a11\n"


@pytest.mark.parametrize("text, says", [
    ("x: " + "[" * 100000 + "]" * 100000 + "\nscheme: W4A16\n", "nested too deeply"),  # libyaml segfaulted
    (ALIAS_BOMB, "aliases"),  # 9^12 nodes for whoever walks it
    ("scheme: " + "9" * 15000 + "\n", "not a readable recipe"),
    ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      targets:\n      scheme: W4A16\n", "recipe"),
    ("scheme: W4A16\n" + "#" * (5 << 20), "bytes"),
])
def test_recipe_bounds(tmp_path, text, says):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=says):
        _timed(Recipe.from_file, p)


# -- artifacts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    {"model_type": "no-such-model"},
    {"torch_dtype": "bflmethod: oat16", "dtype": "bflmethod: oat16"},
    {"hidden_size": 4096, "intermediate_size": 16384},  # 180 MB of weights the files do not hold
    {"vocab_size": 10**12},
    {"hidden_act": "Dilu"},
])
def test_artifact_with_a_crafted_config_is_a_format_error(tmp_path, change):
    import dataclasses
    import shutil

    import lowbit
    from conftest import make_tiny_model_dir
    from lowbit.core.errors import FormatError

    art = tmp_path / "a"
    if not art.exists():
        base = make_tiny_model_dir(tmp_path / "b", "llama")
        recipe = Recipe(scheme=dataclasses.replace(lowbit.lookup_scheme("W4A16"), group_size=32))
        lowbit.quantize(str(base), recipe, art)
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError):
        lowbit.load(bad, "cpu")


# -- a short seeded fuzz run per reader -----------------------------------------------------------------------------
def test_short_fuzz_run_finds_nothing(tmp_path):
    """Two seconds of bench/fuzz.py per file reader (a fixed seed, so the same inputs every time)."""
    out = tmp_path / "fuzz.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "--targets", "gguf,safetensors,imatrix,recipe",
                    "--seconds", "2", "--seed", "7", "--crashes", str(tmp_path / "crashes"), "--json", str(out)],
                   check=True, timeout=300, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["crashes"] for r in rows] == [0, 0, 0, 0], rows
    assert all(r["execs"] > 50 for r in rows)
