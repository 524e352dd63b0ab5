"""GGUF evaluation through llama.cpp: the same windows, protocol and metrics as every other artifact.

The slow test scores the SmolLM2 Q4_1 GGUF twice on the same WikiText-2 windows, by llama.cpp and
dequantized (float32) by transformers: the same Q4_1 weights, so perplexities agree within 2% and the
KL divergence between the two is small (llama.cpp quantizes activations to 8 bits inside its Q4_1 dot
products and keeps the KV cache in f16, hence not zero).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lowbit.cli import main
from lowbit.core.errors import LowbitError, ModelLoadError
from lowbit.eval import llamacpp
from lowbit.eval.llamacpp import LlamaCppLogits, resolve_backend, speed


def _tiny_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.ones((16, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_resolve_backend(tmp_path, tiny_llama_dir, monkeypatch, caplog):
    gg = _tiny_gguf(tmp_path / "m.gguf")
    assert resolve_backend(tiny_llama_dir, "auto") == "transformers"
    assert resolve_backend(gg, "transformers") == "transformers"
    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: True)
    assert resolve_backend(gg, "auto") == "llamacpp"
    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="lowbit.eval.llamacpp"):
        assert resolve_backend(gg, "auto") == "transformers"
    assert "llama-cpp-python is not installed" in caplog.text
    with pytest.raises(LowbitError, match="runs .gguf files only"):
        resolve_backend(tiny_llama_dir, "llamacpp")
    with pytest.raises(LowbitError, match="unknown backend"):
        resolve_backend(gg, "vllm")


def test_truncated_or_foreign_gguf_is_a_clear_error(tmp_path, capsys):
    data = _tiny_gguf(tmp_path / "m.gguf").read_bytes()
    for n in (10, 40, len(data) - 64):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(ModelLoadError, match="truncated|corrupt"):
            LlamaCppLogits(cut, ctx=32)
    fake = tmp_path / "fake.gguf"
    fake.write_text("<html>404 not found</html>")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        LlamaCppLogits(fake, ctx=32)
    assert main(["--no-progress", "eval", str(fake), "--backend", "llamacpp"]) == 2
    r = capsys.readouterr()
    assert "not a GGUF file" in r.out + r.err


class _FakeLlama:
    """Counts the tokens a speed measurement evaluates."""

    def __init__(self, n_ctx: int, n_vocab: int = 100) -> None:
        self._n_ctx, self._n_vocab, self.n_tokens, self.batches = n_ctx, n_vocab, 0, []
        self.context_params = SimpleNamespace(n_threads=3)

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._n_vocab

    def reset(self) -> None:
        self.n_tokens = 0

    def eval(self, tokens: list[int]) -> None:
        self.n_tokens += len(tokens)
        assert self.n_tokens <= self._n_ctx and all(0 <= t < self._n_vocab for t in tokens)
        self.batches.append(len(tokens))
        # a fake clock: a full prefill costs 1, 3, then 2 ms per token (median 2), a decode step 10 ms
        if len(tokens) > 2:
            self.clock += len(tokens) * [1e-3, 3e-3, 2e-3][self.prefills % 3]
            self.prefills += 1
        elif len(tokens) == 1:
            self.clock += 1e-2

    clock = 0.0
    prefills = -1  # the warm-up's partial prefill comes first


def test_speed_fits_the_context(monkeypatch):
    import lowbit.eval.llamacpp as lc

    llm = _FakeLlama(n_ctx=100)
    monkeypatch.setattr(lc.time, "perf_counter", lambda: llm.clock)
    s = speed(llm, n_prompt=512, n_gen=30, reps=3)
    assert (s.n_prompt, s.n_gen, s.threads) == (70, 30, 3)  # prompt shrunk to n_ctx - n_gen
    # prefill: 70 tokens over the median run (2 ms a token); decode: 30 steps over 30 x 10 ms
    assert s.prefill_tps == pytest.approx(500.0) and s.decode_tps == pytest.approx(100.0)
    assert llm.batches.count(70) == 3 and llm.batches[-30:] == [1] * 30
    with pytest.raises(LowbitError, match="larger context"):
        speed(_FakeLlama(n_ctx=20), n_gen=30)


def test_logits_callable_checks_its_input():
    m = object.__new__(LlamaCppLogits)
    m.path, m.ctx = Path("m.gguf"), 8
    m.llm = SimpleNamespace(n_vocab=lambda: 10)
    with pytest.raises(LowbitError, match="one sequence"):
        m(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(LowbitError, match="exceeds the llama.cpp context"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(LowbitError, match="outside"):
        m(torch.tensor([[1, 2, 10]]))


@pytest.mark.slow
def test_llamacpp_and_transformers_agree_on_smollm2(tmp_path, monkeypatch, capsys):
    """Through the CLI: the GGUF by llama.cpp against the same GGUF dequantized by transformers."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install -e '.[llamacpp]'")
    from lowbit.models.sources import ensure_gguf

    gg = ensure_gguf("smollm2-135m")
    full = LlamaCppLogits.speed
    monkeypatch.setattr(LlamaCppLogits, "speed", lambda self: full(self, 128, 32, 1))  # short: this checks wiring
    out = tmp_path / "eval.json"
    assert main(["--no-progress", "eval", str(gg), "--reference", str(gg), "--ctx", "256", "--max-windows", "2",
                 "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "prefill" in table and "decode" in table  # the tokens/s columns
    res = json.loads(out.read_text())
    cpp, ref = res["results"][gg.name], res["results"]["reference"]
    print(f"{res['corpus']}: llama.cpp ppl {cpp['ppl']:.4f}, transformers ppl {ref['ppl']:.4f}, "
          f"KLD {cpp['kld_mean']:.5f}, top-1 {cpp['top1']:.4f}, speed {cpp['speed']}")
    assert cpp["backend"] == "llama.cpp" and "backend" not in ref
    assert cpp["n_tokens"] == ref["n_tokens"] == 2 * 255
    assert abs(cpp["ppl"] / ref["ppl"] - 1) < 0.02
    assert cpp["kld_mean"] < 0.02 and cpp["top1"] > 0.9
    assert cpp["speed"]["prefill_tps"] > 0 and cpp["speed"]["decode_tps"] > 0


def test_speed_runs_use_flash_attention_and_evaluation_does_not(tmp_path, monkeypatch):
    """llama-bench's default (``-fa auto``) runs llama.cpp's fused attention on the CPU: lowbit's speed
    figures open the model the same way (without it, pp512 was 0.73-0.86x llama-bench's); evaluation keeps
    the unfused path (the logits llama.cpp's reference tools give with their plain settings)."""
    import lowbit.compare.speed as cs
    import lowbit.eval.llamacpp as lc

    opened: list[dict] = []

    class _Llama:
        def __init__(self, path, **kw):
            opened.append(kw)

    monkeypatch.setattr(lc, "_llama_cpp", lambda: SimpleNamespace(Llama=_Llama))
    monkeypatch.setattr(lc, "speed", lambda llm, **kw: lc.Speed(1.0, 1.0, 8, 8, 2))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    lc.open_llama(f, 64, logits_all=False, check=False, flash_attn=True)
    lc.open_llama(f, 64, logits_all=True, check=False)
    assert opened[0].get("flash_attn") is True and "flash_attn" not in opened[1]
    monkeypatch.setattr(lc, "check_gguf", lambda p: None)
    opened.clear()
    cs.measure_gguf(str(f), 2, 8, 8, 1)
    assert opened and opened[0].get("flash_attn") is True  # what lowbit compare's GGUF rows measure
