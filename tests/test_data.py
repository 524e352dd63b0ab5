"""Tests of lowbit.data.corpora (no network; the shared data folder is used when present)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from lowbit.core.errors import DataError
from lowbit.data import (
    WIKITEXT2_TEST_SHA256,
    c4_texts,
    calibration_tokens,
    corpora,
    default_eval_corpus,
    python_docs,
    python_docs_documents,
    resolve_calib_texts,
    resolve_eval_text,
    text_file,
    wikitext2_test,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
ABSENT = "absent: put the data folder at ../shared/data beside the checkout (strict mode fails here)"
has_wiki = pytest.mark.skipif(not WIKI.is_file(), reason=f"shared WikiText-2 {ABSENT}")


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300, BOS "<s>" prepended) trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = ["the quick brown fox jumps over the lazy dog", "lorem ipsum dolor sit amet"] * 20
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """No LOWBIT_DATA, no shared folder, no `datasets`."""
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.setattr(corpora, "_default_roots", lambda: [tmp_path / "nothing"])

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed


@has_wiki
def test_wikitext2_matches_hf_rows_joined():
    text = wikitext2_test(WIKI)
    raw = WIKI.read_text(encoding="utf-8")
    lines = raw.split("\n")[:-1]  # the file ends with "\n"
    rows = [line + "\n" if line.strip() else "" for line in lines]
    assert len(rows) == 4358
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert wikitext2_test(WIKI, raw=True) == raw
    assert wikitext2_test(SHARED) == text  # a data folder works too


@has_wiki
def test_wikitext2_env(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "_default_roots", lambda: [tmp_path / "nothing"])
    monkeypatch.setenv("LOWBIT_DATA", str(SHARED))
    assert wikitext2_test().startswith("\n\n = Robert Boulter")
    monkeypatch.setenv("LOWBIT_DATA", str(WIKI))
    assert wikitext2_test().startswith("\n\n = Robert Boulter")
    assert default_eval_corpus() == "wikitext2"


def test_wikitext2_bad_hash(tmp_path, monkeypatch):
    bad = tmp_path / "wikitext-2-raw" / "wiki.test.raw"
    bad.parent.mkdir()
    bad.write_text(" \n = Not It = \n", encoding="utf-8")
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    for arg in (bad, tmp_path):
        with pytest.raises(DataError) as e:
            wikitext2_test(arg)
        assert digest in str(e.value) and WIKITEXT2_TEST_SHA256 in str(e.value)
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=digest):
        wikitext2_test()


def test_wikitext2_missing(no_data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        wikitext2_test(tmp_path / "nope.raw")
    with pytest.raises(DataError, match="LOWBIT_DATA"):
        wikitext2_test()
    assert default_eval_corpus() == "python-docs"
    label, text = resolve_eval_text("python-docs")
    assert label == "python-docs" and text == python_docs("eval")


def test_python_docs_split_disjoint_and_deterministic():
    calib, ev = python_docs_documents("calib"), python_docs_documents("eval")
    assert calib and ev and not set(calib) & set(ev)
    assert 0.15 < len(ev) / (len(ev) + len(calib)) < 0.5
    assert python_docs("eval") == "\n\n".join(ev) == python_docs("eval")
    with pytest.raises(DataError):
        python_docs("train")  # type: ignore[arg-type]


def test_c4_and_text_files(tmp_path, monkeypatch):
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"text": "beta", "url": "x"}) + "\n")
    assert c4_texts(p) == ["alpha", "beta"]
    assert resolve_calib_texts(f"c4:{p}") == ["alpha", "beta"]
    assert resolve_calib_texts(str(p)) == ["alpha", "beta"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        c4_texts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="'text'"):
        c4_texts(tmp_path / "nofield.jsonl")
    t = tmp_path / "a.txt"
    t.write_text("hello world\n", encoding="utf-8")
    assert text_file(t) == "hello world\n"
    assert resolve_calib_texts(str(t)) == ["hello world\n"]
    assert resolve_eval_text(str(t)) == ("file:a.txt", "hello world\n")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="UTF-8"):
        text_file(tmp_path / "latin.txt")
    with pytest.raises(DataError, match="C4 is calibration data"):
        resolve_eval_text("c4")
    with pytest.raises(DataError, match="test"):
        resolve_calib_texts("wikitext2")
    with pytest.raises(DataError, match="neither"):
        resolve_calib_texts("no-such-corpus")
    assert resolve_calib_texts("python-docs") == python_docs_documents("calib")
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4_validation_2k.jsonl").write_text('{"text": "gamma"}\n')
    assert resolve_calib_texts("c4") == ["gamma"]


@pytest.mark.skipif(not (SHARED / "c4" / "c4_validation_2k.jsonl").is_file(), reason=f"shared C4 {ABSENT}")
def test_c4_shared(monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    assert len(c4_texts()) == 2000


def _is_window_of(row: list[int], stream: list[int]) -> bool:
    n = len(row)
    return any(stream[i : i + n] == row for i in range(len(stream) - n + 1))


def test_calibration_long_documents():
    tok = tiny_tokenizer()
    docs = [f"document {k}: " + " ".join(f"word{(k * 7 + j) % 13}" for j in range(60)) for k in range(6)]
    enc = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    x = calibration_tokens(tok, docs, n_samples=4, seq_len=16, seed=1)
    assert x.shape == (4, 16) and x.dtype == torch.long
    assert all(any(_is_window_of(r, e) for e in enc) for r in x.tolist())
    assert torch.equal(x, calibration_tokens(tok, docs, 4, 16, seed=1))
    assert not torch.equal(x, calibration_tokens(tok, docs, 4, 16, seed=2))


def test_calibration_short_documents_concatenated():
    tok = tiny_tokenizer()
    docs = ["the quick brown fox", "jumps over", "the lazy dog", "lorem ipsum"]
    x = calibration_tokens(tok, docs, n_samples=3, seq_len=12, seed=0)
    assert x.shape == (3, 12)
    assert tok.bos_token_id not in x.flatten().tolist()  # no special tokens in any row
    # every row is a window of the documents joined by blank lines, in one of their orders: a window
    # that crossed into padding, a BOS or a document boundary without "\n\n" would not be found
    import itertools

    streams = [tok("\n\n".join(p), add_special_tokens=False)["input_ids"] for p in itertools.permutations(docs)]
    assert all(any(_is_window_of(r, st) for st in streams) for r in x.tolist())


def test_calibration_errors():
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match="empty"):
        calibration_tokens(tok, ["", "  \n "], 1, 8)
    with pytest.raises(DataError, match=r"too short.*seq_len=500"):
        calibration_tokens(tok, ["the quick brown fox"], 1, 500)
