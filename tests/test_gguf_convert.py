"""HF -> GGUF conversion: llama.cpp (llama-cpp-python) loads our files and computes what transformers computes;
whole files are byte-identical to llama.cpp's own quantizer (``llama_model_quantize``) on the same F32 input."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import ARCHS, make_tiny_model_dir
from lowbit.core.errors import LowbitError
from lowbit.formats.gguf.ftypes import FILE_TYPES
from lowbit.formats.gguf.imatrix import Imatrix, load_imatrix, save_imatrix
from lowbit.formats.gguf.writer import write_gguf

TEXTS = ["the quick brown fox jumps over the lazy dog", "  two  spaces, tabs\t and 12345 digits!",
         "hello world this is a test of the tokenizer"]


def _llama(path: Path, **kw):  # type: ignore[no-untyped-def]
    try:
        from llama_cpp import Llama
    except ImportError as e:  # CI installs it: a missing client is a failure, not a skip
        raise AssertionError("llama-cpp-python is required for the GGUF tests (see .ci/run)") from e
    return Llama(model_path=str(path), verbose=False, n_threads=1, **kw)


def _hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_file_computes_what_transformers_computes(tmp_path: Path, arch: str) -> None:
    folder = make_tiny_model_dir(tmp_path / arch, arch)
    out = write_gguf(folder, tmp_path / "m.gguf", "F32").path
    llm = _llama(out, n_ctx=64, logits_all=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    for t in TEXTS:
        assert llm.tokenize(t.encode(), add_bos=False, special=False) == tok.encode(t, add_special_tokens=False)
    ids = [1] + tok.encode(TEXTS[0], add_special_tokens=False)
    llm.reset()
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    ref = _hf_logits(folder, ids)
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max()), arch
    r = gguf.GGUFReader(out)
    expected = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3": "gemma3", "qwen3": "qwen3"}[arch]
    assert r.fields["general.architecture"].contents() == expected


def _llama_quantize(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(FILE_TYPES[ftype][0])
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def kq_model(tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A tiny Llama whose rows are multiples of 256 (k-quants apply, no fallback) and its F32 GGUF."""
    d = tmp_path_factory.mktemp("kq")
    folder = make_tiny_model_dir(d / "hf", "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                 num_attention_heads=4, num_key_value_heads=1)
    return folder, write_gguf(folder, d / "f32.gguf", "F32").path


@pytest.mark.parametrize("ftype", [f for f in FILE_TYPES if f not in ("F32",)])
def test_whole_file_byte_identical_to_llama_quantize(tmp_path: Path, kq_model: tuple[Path, Path], ftype: str) -> None:
    folder, f32 = kq_model
    ours = write_gguf(folder, tmp_path / "ours.gguf", ftype)
    _llama_quantize(f32, tmp_path / "ref.gguf", ftype)
    a, b = _tensors(ours.path), _tensors(tmp_path / "ref.gguf")
    assert list(a) == list(b), "tensor order differs from llama.cpp's"
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}, "tensor types differ"
    assert [n for n in a if a[n][1] != b[n][1]] == []


def test_imatrix_file_round_trip_and_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    im = Imatrix(datasets=["c4"], chunk_count=3, chunk_size=16)
    im.sums["blk.0.attn_q.weight"] = rng.random((1, 64), dtype=np.float32) * 48
    im.counts["blk.0.attn_q.weight"] = np.array([48.0], dtype=np.float32)
    im.sums["blk.0.ffn_down.weight"] = rng.random((1, 32), dtype=np.float32)
    im.counts["blk.0.ffn_down.weight"] = np.array([0.0], dtype=np.float32)
    back = load_imatrix(save_imatrix(im, tmp_path / "im.gguf"))
    assert back.names() == im.names() and back.datasets == ["c4"] and back.chunk_count == 3
    w = back.weights("blk.0.attn_q.weight")
    assert w is not None and np.array_equal(w, (im.sums["blk.0.attn_q.weight"] / np.float32(48)).reshape(-1))
    assert np.array_equal(back.weights("blk.0.ffn_down.weight"), np.ones(32, np.float32))  # no tokens: 1
    # llama.cpp's legacy .dat: E[x^2] * ncall per entry, ncall, then chunk count and dataset name
    legacy = tmp_path / "im.dat"
    vals = (rng.random(16, dtype=np.float32) * 5).astype("<f4")
    name = b"blk.1.attn_k.weight"
    legacy.write_bytes(np.int32(1).tobytes() + np.int32(len(name)).tobytes() + name + np.int32(5).tobytes()
                       + np.int32(16).tobytes() + vals.tobytes() + np.int32(7).tobytes() + np.int32(2).tobytes()
                       + b"c4")
    old = load_imatrix(legacy)
    assert old.chunk_count == 7 and old.datasets == ["c4"]
    assert np.array_equal(old.weights("blk.1.attn_k.weight"), vals / np.float32(5))
    legacy.write_bytes(b"\x01\x00\x00\x00\xff")
    with pytest.raises(LowbitError, match="imatrix"):
        load_imatrix(legacy)


def test_unknown_architecture_is_a_clear_error(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="no GGUF mapping"):
        write_gguf(folder, tmp_path / "x.gguf", "F16")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_real_tokenizers_match_transformers_in_llama_cpp(tmp_path: Path, name: str) -> None:
    """Vocab-only GGUF of each real model: llama.cpp splits text exactly as transformers does."""
    from transformers import AutoTokenizer

    from lowbit.data import wikitext2_test
    from lowbit.models.sources import ensure_source

    folder = ensure_source(name)
    out = write_gguf(folder, tmp_path / "vocab.gguf", "F16", vocab_only=True).path
    llm = _llama(out, vocab_only=True)
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = wikitext2_test()[:20000]
    samples = [*TEXTS, "def f(x):\n    return x ** 2  # ok", "Ünïcödé 日本語 🚀🦙 ...", text]
    for t in samples:
        assert llm.tokenize(t.encode(), add_bos=False, special=False) == tok.encode(t, add_special_tokens=False)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_S", "Q2_K", "Q5_K_M", "Q6_K", "Q4_0", "Q5_1"])
def test_whole_file_with_imatrix_equals_ggml_per_tensor(tmp_path: Path, kq_model: tuple[Path, Path],
                                                        ftype: str) -> None:
    """With an imatrix every tensor is what ggml_quantize_chunk writes given E[x^2] = in_sum2 / counts."""
    from gguf_ref import ggml_quantize_ref

    folder, f32 = kq_model
    src = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
           for t in gguf.GGUFReader(f32).tensors}
    rng = np.random.default_rng(1)
    im = Imatrix(datasets=["random"], chunk_count=1, chunk_size=64)
    for n, a in src.items():
        if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n:
            im.sums[n] = (rng.random((1, a.shape[1]), dtype=np.float32) ** 3 * 64).astype(np.float32)
            im.counts[n] = np.array([64.0], dtype=np.float32)
    ours = write_gguf(folder, tmp_path / "ours.gguf", ftype, imatrix=load_imatrix(save_imatrix(im, tmp_path / "i")))
    _llama_quantize(f32, tmp_path / "ref.gguf", ftype)  # tensor types without imatrix: the same for these types
    ref_types = {n: t for n, (t, _) in _tensors(tmp_path / "ref.gguf").items()}
    if ftype == "Q4_0":  # with an imatrix llama.cpp moves the first eighth of ffn_down to Q4_1
        ref_types["blk.0.ffn_down.weight"] = "Q4_1"
    got = _tensors(ours.path)
    assert {n: t for n, (t, _) in got.items()} == ref_types
    for n, (t, b) in got.items():
        if t in ("F32", "F16", "BF16", "Q8_0"):
            continue
        w = im.weights(n)
        expected = ggml_quantize_ref(src[n], gguf.GGMLQuantizationType[t], w)
        assert b == expected.tobytes(), f"{n} ({t}) differs from ggml_quantize_chunk with the imatrix"


@pytest.mark.parametrize(("preset", "gs", "expect"), [("W4A16", 32, "Q4_0"), ("W4A16_ASYM", 32, "Q4_1"),
                                                      ("W8A16", 32, "Q8_0"), ("W4A16", 64, "Q5_0")])
def test_lowbit_artifact_to_gguf_keeps_codes(tmp_path: Path, preset: str, gs: int, expect: str) -> None:
    """A lowbit RTN artifact exports without re-quantizing when the grid fits a GGUF type; llama.cpp then
    computes what lowbit's own loader computes from the artifact."""
    from lowbit.core.scheme import get_scheme
    from lowbit.jobs import load_artifact, quantize
    from lowbit.pipeline.engine import Engine
    from lowbit.recipe import Recipe

    folder = make_tiny_model_dir(tmp_path / "hf", "llama")
    art = quantize(str(folder), Recipe(get_scheme(preset, group_size=gs)), tmp_path / "art",
                   engine=Engine(progress=False)).path
    rep = write_gguf(art, tmp_path / "m.gguf", "auto")
    linears = [n for n in rep.types if n.startswith("blk.") and "norm" not in n]
    assert {rep.types[n] for n in linears} == {expect}
    if gs == 32:  # carried over: symmetric exactly, asymmetric with the min rounded to float16
        assert sorted(rep.carried + rep.carried_rounded) == sorted(linears) and not rep.requantized
        assert bool(rep.carried_rounded) == preset.endswith("ASYM")
    else:  # g64 4-bit: Q4_K's row-length fallback, re-quantized from the artifact's weights, and said so
        assert sorted(rep.requantized) == sorted(linears)
    from transformers import AutoModelForCausalLM

    ids = [1, 5, 17, 42, 99, 7, 250, 3]
    llm = _llama(rep.path, n_ctx=32, logits_all=True)
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    artifact = load_artifact(art)
    # the file's own weights, dequantized by transformers' GGUF reader (it also undoes llama.cpp's q/k row order)
    filed = AutoModelForCausalLM.from_pretrained(rep.path.parent, gguf_file=rep.path.name, dtype=torch.float32)
    with torch.no_grad():
        ref = filed(torch.tensor([ids])).logits[0].numpy()
        mine = artifact(torch.tensor([ids])).logits[0].numpy()
    # llama.cpp computes what the file holds, up to its CPU kernels rounding activations to 8 bits (q8_0,
    # 32-blocks: 2^-8 of a block's absmax per element), measured 3.1e-3 / 3.8e-3 on logits of max 0.6
    assert np.abs(ours - ref).max() < 1e-2 * max(1.0, np.abs(ref).max())
    if gs == 32 and not rep.carried_rounded:  # carried codes: the file holds the artifact's weights exactly
        assert np.array_equal(ref, mine)
        return
    for name, mod in artifact.named_modules():
        if not hasattr(mod, "qweight"):
            continue
        a = mod.qweight().dequantize(torch.float32).reshape(-1, 32)
        b = filed.get_submodule(name).weight.reshape(-1, 32)
        amax = a.abs().amax(-1, keepdim=True)
        if gs == 32:  # Q4_1 carried, its min m and step d stored in fp16 (2^-11 relative; |m|, 15 d <= 2 amax)
            bound = amax * 2**-9
        else:  # re-quantized to Q5_0: d = -max / 16 (the signed extreme), codes -16..15, fp16 d (<= 16 steps x
            # 2^-11 = 2^-10 amax): half a step, but a full one where the other sign's extreme clamps at 15 d
            bound = torch.where(a.abs() > 15.5 / 16 * amax, amax / 16, amax / 32) + amax * 2**-10
        assert bool(((a - b).abs() <= bound).all()), (name, float(((a - b).abs() / amax).max()))


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A tiny Qwen3 with k-quant-sized rows and, as in the real models, a head_dim (128) apart from
    hidden / heads (64): q_proj is 512 x 256, o_proj 256 x 512; its F32 GGUF."""
    d = tmp_path_factory.mktemp("qwen3")
    folder = make_tiny_model_dir(d / "hf", "qwen3", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=128)
    return folder, write_gguf(folder, d / "f32.gguf", "F32").path


def test_qwen3_metadata_and_q_k_norms(qwen3_model: tuple[Path, Path]) -> None:
    """llama.cpp's qwen3 keys: key/value length from head_dim (not hidden / heads), the per-head q/k norms
    as attn_q_norm / attn_k_norm (head_dim each, F32), no q/k permutation (checked by the F32 logits test)."""
    _, f32 = qwen3_model
    r = gguf.GGUFReader(f32)
    assert r.fields["general.architecture"].contents() == "qwen3"
    assert r.fields["qwen3.attention.key_length"].contents() == 128
    assert r.fields["qwen3.attention.value_length"].contents() == 128
    t = {x.name: x for x in r.tensors}
    for i in range(2):
        for n in ("attn_q_norm", "attn_k_norm"):
            w = t[f"blk.{i}.{n}.weight"]
            assert tuple(w.shape) == (128,) and w.tensor_type.name == "F32"
    assert tuple(t["blk.0.attn_q.weight"].shape) == (256, 512)  # GGUF shapes are (cols, rows)


@pytest.mark.parametrize("ftype", ["Q8_0", "Q6_K", "Q4_K_M"])
def test_qwen3_quantized_file_is_llamas_and_tracks_the_float_model(tmp_path: Path, qwen3_model: tuple[Path, Path],
                                                                   ftype: str) -> None:
    """Qwen3 at a quantized file type: every tensor's type and bytes are those llama.cpp's own quantizer
    writes from our F32 file, and llama.cpp runs it with logits near transformers' float ones. The bound
    is per type from the numerics: a weight of a b-bit block type is off by up to half a step of its
    block's range (1/254 of the block's absmax for Q8_0, about 4x that per bit less), and llama.cpp also
    rounds activations to 8 bits; over 14 untrained linears the relative logit error measured 0.019
    (Q8_0), 0.053 (Q6_K), 0.17 (Q4_K_M), so 2.5x those bounds it with room while a misread layout (errors
    of order 1) cannot pass."""
    folder, f32 = qwen3_model
    ours = write_gguf(folder, tmp_path / "ours.gguf", ftype)
    _llama_quantize(f32, tmp_path / "ref.gguf", ftype)
    a, b = _tensors(ours.path), _tensors(tmp_path / "ref.gguf")
    assert list(a) == list(b) and {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    assert [n for n in a if a[n][1] != b[n][1]] == []
    ids = [1, 5, 17, 42, 99, 7, 250, 3, 77, 120, 201, 9]
    llm = _llama(ours.path, n_ctx=64, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    ref = _hf_logits(folder, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < {"Q8_0": 0.05, "Q6_K": 0.13, "Q4_K_M": 0.42}[ftype], rel


def test_qwen3_lowbit_artifact_to_gguf_keeps_codes(tmp_path: Path) -> None:
    """A lowbit W4A16 g32 Qwen3 artifact exports to Q4_0 with its codes carried over; llama.cpp computes what
    lowbit's loader computes from the artifact (1e-2: llama.cpp rounds activations to 8 bits, as in
    test_lowbit_artifact_to_gguf_keeps_codes)."""
    from lowbit.core.scheme import get_scheme
    from lowbit.jobs import load_artifact, quantize
    from lowbit.pipeline.engine import Engine
    from lowbit.recipe import Recipe

    folder = make_tiny_model_dir(tmp_path / "hf", "qwen3")
    art = quantize(str(folder), Recipe(get_scheme("W4A16", group_size=32)), tmp_path / "art",
                   engine=Engine(progress=False)).path
    rep = write_gguf(art, tmp_path / "m.gguf", "auto")
    linears = [n for n in rep.types if n.startswith("blk.") and "norm" not in n]
    assert len(linears) == 14 and sorted(rep.carried) == sorted(linears) and not rep.requantized
    ids = [1, 5, 17, 42, 99, 7, 250, 3]
    llm = _llama(rep.path, n_ctx=32, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ref = load_artifact(art)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-2 * max(1.0, np.abs(ref).max())


def test_cli_refuses_truncated_or_corrupt_gguf_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lowbit.cli import main

    folder = make_tiny_model_dir(tmp_path / "hf", "llama")
    good = write_gguf(folder, tmp_path / "good.gguf", "F16").path
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    for name, words in (("cut", "truncated"), ("bad", "corrupt"), ("junk", "not a GGUF")):
        out = tmp_path / f"{name}-out.gguf"
        assert main(["gguf", str(tmp_path / f"{name}.gguf"), "-o", str(out), "--type", "Q8_0"]) == 2
        assert words in capsys.readouterr().err.replace("\n", " ")
        assert not out.exists()
    assert main(["gguf", str(good), "-o", str(tmp_path / "re.gguf"), "--type", "Q8_0"]) == 0  # GGUF input works
    assert gguf.GGUFReader(tmp_path / "re.gguf").fields["general.file_type"].contents() == 7


def test_lowbit_imatrix_sums_squares_of_every_linear_input(tmp_path: Path) -> None:
    """``lowbit imatrix``: per GGUF tensor name, sum_t x_tj^2 over the calibration tokens and their count,
    checked against plain forward hooks on the float model."""
    from transformers import AutoModelForCausalLM

    from lowbit.cli import main
    from lowbit.data import calibration_tokens, resolve_calib_texts
    from lowbit.models.loader import load_model

    folder = make_tiny_model_dir(tmp_path / "hf", "qwen2")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(TEXTS * 40))
    out = tmp_path / "imatrix.gguf"
    assert main(["--no-progress", "imatrix", str(folder), "-o", str(out), "--calib", str(text),
                 "--calib-samples", "3", "--calib-len", "16", "--device", "cpu"]) == 0
    im = load_imatrix(out)
    tokens = calibration_tokens(load_model(folder).tokenizer, resolve_calib_texts(str(text)), 3, 16, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(m, args):  # type: ignore[no-untyped-def]
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
        return fn

    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n:
            m.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        model(tokens)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    assert len(im.names()) == len(sums) == 14
    for n, s in sums.items():
        g = tmap.get_name(n + ".weight", try_suffixes=(".weight",))
        assert im.counts[g].tolist() == [48.0]
        np.testing.assert_allclose(im.sums[g].reshape(-1), s.float().numpy(), rtol=1e-4, atol=1e-6)
