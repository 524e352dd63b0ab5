"""The tokenizer of a Hugging Face folder, written as llama.cpp reads it (``tokenizer.ggml.*``).

Three sources, as llama.cpp's ``convert_hf_to_gguf.py`` handles them:

* ``tokenizer.model`` (SentencePiece): model ``llama``, pieces with their scores and types.
* ``tokenizer.json`` byte-level BPE (GPT-2 style): model ``gpt2``, tokens, merges, and the pre-tokenizer
  name, found by hashing the tokenization of a fixed probe text (the hash table is llama.cpp's, kept as
  data in ``pre_tokenizers.json``).
* ``tokenizer.json`` BPE with byte fallback over ``▁``-joined text (a SentencePiece BPE model converted to
  the fast format, e.g. Gemma without ``tokenizer.model``): model ``llama`` with scores rebuilt from the merge
  ranks. llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece has the highest score;
  giving each piece ``-rank`` of the first merge that produces it reproduces the BPE merge order.

Special token ids, add-bos/eos flags and the chat template come from ``gguf.SpecialVocab`` (tokenizer.json,
tokenizer_config.json, config.json, chat_template.jinja).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from lowbit.core.errors import LowbitError

logger = logging.getLogger(__name__)

_PRE = Path(__file__).with_name("pre_tokenizers.json")
TT = gguf.TokenType


@dataclass
class GGUFVocab:
    """What goes under ``tokenizer.ggml.*``; ``scores`` only for the ``llama`` model, ``merges`` for ``gpt2``."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None

    def add_to(self, w: gguf.GGUFWriter, folder: Path, n_vocab: int) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
        special.merges = self.merges
        special.add_to_gguf(w, quiet=True)


def _looks_special(tok: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens some models forget to flag as special."""
    return (tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<｜") and tok.endswith("｜>")) or (tok.startswith("<unused") and tok.endswith(">")))


def _is_gpt2_pre(pre: dict[str, Any] | None) -> bool:
    """tokenizer.json's pre-tokenizer is plain GPT-2 byte-level splitting (its regex, nothing else)."""
    if pre and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)  # type: ignore[union-attr]


def _pre_tokenizer(folder: Path, tj: dict[str, Any]) -> str:
    from transformers import AutoTokenizer

    table = json.loads(_PRE.read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(str(folder))
    h = sha256(str(tok.encode(table["chktxt"])).encode()).hexdigest()
    if h not in table["hashes"] and _is_gpt2_pre(tj.get("pre_tokenizer")):
        return "gpt-2"  # a tokenizer trained by the user with GPT-2's splitting: llama.cpp's "gpt-2" is exact
    if h not in table["hashes"]:
        raise LowbitError(
            f"the BPE pre-tokenizer of {folder} is unknown to llama.cpp (probe hash {h}): llama.cpp would split "
            f"text differently from transformers. Fix: use a model family llama.cpp supports, or a newer lowbit "
            f"whose pre_tokenizers.json lists this hash")
    return str(table["hashes"][h])


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _hf_token_list(tj: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int], dict[int, dict]]:
    """Tokens by id from tokenizer.json (vocab + added tokens), ``[PADi]`` for holes up to ``n_vocab``."""
    by_id: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    n = max(n_vocab, max(by_id) + 1)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
        elif i in added:
            a = added[i]
            special = a.get("special", False) or _looks_special(a["content"])
            tokens.append(a["content"] if special else a["content"].replace("▁", " "))
            types.append(TT.CONTROL if special else TT.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TT.UNUSED if by_id[i] == f"[PAD{i}]" else TT.NORMAL)  # a placeholder written by a converter
    return tokens, types, added


def _gpt2_vocab(folder: Path, tj: dict[str, Any], n_vocab: int) -> GGUFVocab:
    tokens, types, _ = _hf_token_list(tj, n_vocab)
    return GGUFVocab("gpt2", _pre_tokenizer(folder, tj), tokens, types, merges=_merges(tj["model"]))


def _spm_bpe_vocab(tj: dict[str, Any], n_vocab: int) -> GGUFVocab:
    """SentencePiece BPE stored as tokenizer.json (byte fallback): scores rebuilt from the merge ranks."""
    model = tj["model"]
    tokens, types, added = _hf_token_list(tj, n_vocab)
    rank: dict[str, int] = {}
    for r, m in enumerate(_merges(model)):
        rank.setdefault(m.replace(" ", ""), r)
    unk = model.get("unk_token")
    scores = []
    for i, t in enumerate(tokens):
        scores.append(-float(rank[t]) if t in rank and i not in added else 0.0)
        if i in added or types[i] == TT.UNUSED:
            continue
        if t == unk:
            types[i] = TT.UNKNOWN
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = TT.BYTE
    return GGUFVocab("llama", "default", tokens, types, scores=scores, add_space_prefix=False)


def _sentencepiece_vocab(path: Path, n_vocab: int) -> GGUFVocab:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i) else
                     TT.UNUSED if sp.is_unused(i) else TT.BYTE if sp.is_byte(i) else TT.NORMAL)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(TT.UNUSED)
    added = path.with_name("tokenizer.json")
    if added.is_file():  # added tokens override pieces (e.g. Gemma's <start_of_turn>)
        for a in json.loads(added.read_text(encoding="utf-8")).get("added_tokens", []):
            i = a["id"]
            if i < len(tokens):
                tokens[i] = a["content"]
                types[i] = TT.CONTROL if a.get("special", False) else TT.USER_DEFINED
    return GGUFVocab("llama", "default", tokens, types, scores=scores, add_space_prefix=False)


def load_vocab(folder: str | Path, n_vocab: int) -> GGUFVocab:
    """The llama.cpp vocabulary of the tokenizer in ``folder`` (``n_vocab``: the model's embedding rows)."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return _sentencepiece_vocab(folder / "tokenizer.model", n_vocab)
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise LowbitError(f"{folder} has no tokenizer.json or tokenizer.model: GGUF needs the tokenizer. "
                          f"Fix: save the tokenizer next to the weights (tokenizer.save_pretrained(folder))")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"tokenizer type {model.get('type')!r} in {tj_path} is not supported for GGUF export "
                          f"(BPE and SentencePiece are)")
    if model.get("byte_fallback"):
        return _spm_bpe_vocab(tj, n_vocab)
    return _gpt2_vocab(folder, tj, n_vocab)
