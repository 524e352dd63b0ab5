"""Evaluation and calibration corpora: WikiText-2 test, CPython's pydoc topics, C4, plain text files.

Where the data comes from (first hit wins), for every file-backed corpus:

1. an explicit path argument;
2. the environment variable ``LOWBIT_DATA``: a data directory laid out like ``/work/shared/data``
   (``wikitext-2-raw/wiki.test.raw``, ``c4/c4_validation_2k.jsonl``) or the file itself;
3. ``../shared/data`` relative to the current directory (the project's shared data folder), then
   the same folder next to the source checkout;
4. for WikiText-2 only: the ``datasets`` library when importable and online.

Data files are never copied into the repository; they are read where they lie.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any, Literal

import torch

from lowbit.core.errors import DataError
from lowbit.data.sources import (
    DEFAULT_CAP,
    HF_PREFIX,
    iter_documents,
    iter_jsonl,
    read_text_prefix,
    sample_documents,
)

log = logging.getLogger(__name__)

WIKITEXT2_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
WIKITEXT2_TEST_REL = Path("wikitext-2-raw") / "wiki.test.raw"
C4_REL = Path("c4") / "c4_validation_2k.jsonl"
ENV_VAR = "LOWBIT_DATA"

_FIX_WIKI = (
    f"pass the path of wiki.test.raw explicitly, set {ENV_VAR} to a folder holding "
    f"{WIKITEXT2_TEST_REL}, or run from the project root so that ../shared/data is found"
)


def _default_roots() -> list[Path]:
    """Data folders searched after ``LOWBIT_DATA``: ``./../shared/data``, then the one beside the checkout."""
    roots = [Path.cwd() / ".." / "shared" / "data"]
    checkout = Path(__file__).resolve().parents[3]  # src/lowbit/data/corpora.py -> repo root
    roots.append(checkout / ".." / "shared" / "data")
    return roots


def _find(rel: Path) -> Path | None:
    """Locate ``rel`` under ``LOWBIT_DATA`` (a folder, or the file itself) or the default data roots."""
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        if p.is_file() and p.name == rel.name:
            return p
        if (p / rel).is_file():
            return p / rel
        if (p / rel.name).is_file():
            return p / rel.name
        log.debug("%s=%s holds no %s", ENV_VAR, env, rel)
    for root in _default_roots():
        if (root / rel).is_file():
            return (root / rel).resolve()
    return None


def find_data_file(rel: str | Path) -> Path | None:
    """Where the data file ``rel`` (relative to a data folder, e.g. ``arc/arc_easy.jsonl``) is found
    under ``LOWBIT_DATA`` or the default data roots, or None."""
    return _find(Path(rel))


def find_wikitext2_test() -> Path | None:
    """Where wiki.test.raw is found without an explicit path (no hash check), or None."""
    return _find(WIKITEXT2_TEST_REL)


def _gptq_join(rows: list[str]) -> str:
    """Join dataset rows the way the GPTQ/AWQ evaluation does: ``"\\n\\n".join(rows)``."""
    return "\n\n".join(rows)


def _wikitext_rows(raw: str) -> list[str]:
    """The rows of HF ``wikitext/wikitext-2-raw-v1`` from the raw file's text.

    The dataset builder iterates the file line by line and yields each line *with* its trailing
    ``"\\n"`` when the line holds non-blank text, else ``""`` (so ``" \\n"`` becomes ``""``). For
    wiki.test.raw that is 4358 rows, the first two ``""`` and ``" = Robert Boulter = \\n"``.
    """
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")  # text-mode universal newlines
    parts = raw.split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return [line if line.strip() else "" for line in lines]


def _load_from_datasets() -> str:
    """WikiText-2 raw test through the ``datasets`` library (needs the package and the network)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise DataError(f"WikiText-2 test file not found and `datasets` is not installed; {_FIX_WIKI}") from e
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as e:  # any hub or network failure means "not available"
        raise DataError(f"WikiText-2 test file not found and `datasets` failed ({e}); {_FIX_WIKI}") from e
    log.info("WikiText-2 test loaded through `datasets` (no sha256 check possible)")
    return _gptq_join(list(ds["text"]))


def wikitext2_test(path: str | Path | None = None, *, raw: bool = False) -> str:
    """WikiText-2 raw test split, sha256-checked, as the GPTQ protocol text.

    Returns ``"\\n\\n".join(rows)`` where rows are the HF dataset rows (see :func:`_wikitext_rows`:
    each non-blank line keeps its trailing ``"\\n"``, blank lines become ``""``), i.e. exactly
    ``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])``.
    With ``raw=True`` returns the file's text verbatim, which is what ``llama-perplexity -f`` reads.

    Raises DataError when the file is missing (and ``datasets`` cannot fetch it) or its sha256
    differs from ``WIKITEXT2_TEST_SHA256``.
    """
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / WIKITEXT2_TEST_REL if (p / WIKITEXT2_TEST_REL).is_file() else p / WIKITEXT2_TEST_REL.name
        if not p.is_file():
            raise DataError(f"WikiText-2 test file {p} does not exist; {_FIX_WIKI}")
        found: Path | None = p
    else:
        found = find_wikitext2_test()
    if found is None:
        if raw:
            raise DataError(f"WikiText-2 test file not found (raw text needs the file); {_FIX_WIKI}")
        return _load_from_datasets()
    data = found.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WIKITEXT2_TEST_SHA256:
        raise DataError(
            f"{found} has sha256 {digest}, expected {WIKITEXT2_TEST_SHA256}: it is not the canonical "
            "WikiText-2 raw test file (copies in circulation differ by a few bytes and shift perplexity); "
            "use the copy in ../shared/data/wikitext-2-raw/"
        )
    log.info("WikiText-2 test from %s (sha256 ok)", found)
    text = data.decode("utf-8")
    return text if raw else _gptq_join(_wikitext_rows(text))


def _python_docs_split(topic: str) -> Literal["calib", "eval"]:
    """Deterministic split of a pydoc topic: eval when sha256(name)'s first byte is 0 mod 3 (~1/3)."""
    return "eval" if hashlib.sha256(topic.encode("utf-8")).digest()[0] % 3 == 0 else "calib"


def python_docs_documents(split: Literal["calib", "eval"]) -> list[str]:
    """The distinct pydoc topic texts of one split, in topic-name order; calib and eval never share a text.

    A text shared by several topics belongs to its alphabetically first topic's split.
    """
    if split not in ("calib", "eval"):
        raise DataError(f"python-docs split {split!r} does not exist; use 'calib' or 'eval'")
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # stripped-down Python builds drop pydoc_data
        raise DataError(
            "this Python has no pydoc_data module, so the python-docs corpus is unavailable; "
            "use wikitext2 / c4 data files (see ../shared/data) instead"
        ) from e
    owner: dict[str, str] = {}  # text -> first topic name carrying it ("if" and "else" share one text)
    for name in sorted(topics):
        owner.setdefault(topics[name], name)
    docs = [t for t, name in owner.items() if t.strip() and _python_docs_split(name) == split]
    if not docs:
        raise DataError(f"python-docs has no {split} topics in this Python; use another corpus")
    return docs


def python_docs(split: Literal["calib", "eval"]) -> str:
    """Text of CPython's ``pydoc_data.topics`` for one split, topics joined with ``"\\n\\n"``.

    Offline and always present, so it is the default evaluation corpus when WikiText-2 is absent.
    """
    return "\n\n".join(python_docs_documents(split))


def c4_texts(path: str | Path | None = None) -> list[str]:
    """The ``text`` field of every line of a JSON-lines file (default: the shared C4 validation subset)."""
    if path is None:
        found = _find(C4_REL)
        if found is None:
            raise DataError(
                f"C4 calibration file {C4_REL} not found; pass its path (c4:PATH), set {ENV_VAR}, "
                "or run from the project root so that ../shared/data is found"
            )
        p = found
    else:
        p = Path(path)
    if not p.is_file():
        raise DataError(f"JSON-lines file {p} does not exist; check the path")
    texts = list(iter_jsonl(p))
    if not texts:
        raise DataError(f"{p} holds no documents; give a JSON-lines file with a 'text' field per line")
    log.info("%d documents from %s", len(texts), p)
    return texts


def text_file(path: str | Path) -> str:
    """The whole content of a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {p} does not exist; check the path")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text ({e}); convert it to UTF-8") from e


def default_eval_corpus() -> str:
    """``"wikitext2"`` when wiki.test.raw is found locally, else ``"python-docs"`` (logged)."""
    found = find_wikitext2_test()
    if found is not None:
        log.info("default evaluation corpus: wikitext2 (%s)", found)
        return "wikitext2"
    log.info("default evaluation corpus: python-docs (WikiText-2 test file not found; %s)", _FIX_WIKI)
    return "python-docs"


_WIKI_NAMES = {"wikitext2", "wikitext-2", "wikitext", "wikitext2-test"}


def resolve_eval_text(name_or_path: str, max_chars: int | None = None) -> tuple[str, str]:
    """(corpus label, text) for ``wikitext2``, ``python-docs``, a path (UTF-8 text, ``.jsonl`` or ``.parquet``
    with a ``text`` field) or ``hf:NAME[:CONFIG[:SPLIT]]``; a file or dataset is read no further than
    ``max_chars`` characters when given (the windows evaluated need no more)."""
    key = name_or_path.strip().lower()
    if key in _WIKI_NAMES:
        return "wikitext2", wikitext2_test()
    if key in ("python-docs", "pydocs"):
        return "python-docs", python_docs("eval")
    if key.startswith("c4"):
        raise DataError("C4 is calibration data, never evaluation data; evaluate on wikitext2 or python-docs")
    if name_or_path.startswith(HF_PREFIX) or Path(name_or_path).expanduser().is_file():
        return read_text_prefix(name_or_path, max_chars)
    raise DataError(
        f"evaluation corpus {name_or_path!r} is neither a known name nor an existing file; use 'wikitext2', "
        "'python-docs', a path (.txt, .jsonl, .parquet) or hf:NAME[:CONFIG[:SPLIT]]"
    )


def resolve_calib_texts(spec: str, cap: int = DEFAULT_CAP, seed: int = 0) -> list[str]:
    """Calibration documents for ``c4``, ``c4:PATH``, ``python-docs``, a path (``.jsonl``, ``.parquet``, text)
    or ``hf:NAME[:CONFIG[:SPLIT]]``; a file or dataset is streamed and at most ``cap`` documents are kept
    (a seeded reservoir sample; all of them, in order, when there are fewer)."""
    key = spec.strip()
    low = key.lower()
    if low == "c4" or low.startswith("c4:"):
        p = _find(C4_REL) if low == "c4" else Path(key[3:])
        if p is None:
            raise DataError(f"C4 calibration file {C4_REL} not found; pass its path (c4:PATH), set {ENV_VAR}, "
                            "or run from the project root so that ../shared/data is found")
        return _sampled(str(p), cap, seed)
    if low in ("python-docs", "pydocs"):
        return python_docs_documents("calib")
    if low.startswith("wikitext"):
        raise DataError(
            "only the WikiText-2 *test* split is available and calibrating on evaluation text "
            "inflates results; calibrate on 'c4' or 'python-docs'"
        )
    if key.startswith(HF_PREFIX) or Path(key).expanduser().is_file():
        return _sampled(key, cap, seed)
    raise DataError(
        f"calibration source {spec!r} is neither a known name nor an existing file; use 'c4', 'c4:PATH', "
        "'python-docs', a path (.jsonl with a 'text' field, .parquet, .txt) or hf:NAME[:CONFIG[:SPLIT]]"
    )


def _sampled(spec: str, cap: int, seed: int) -> list[str]:
    label, it = iter_documents(spec)
    docs, n = sample_documents(it, cap, seed)
    if not docs:
        raise DataError(f"{spec} holds no documents (every record is blank)")
    if n > len(docs):
        log.info("%s: %d of %d documents sampled (seed %d)", label, len(docs), n, seed)
    else:
        log.info("%s: %d documents", label, n)
    return docs


DEFAULT_CALIB = "c4"
FALLBACK_CALIB = "python-docs"


def calibration_texts(spec: str | None) -> tuple[str, list[str], str | None]:
    """``(corpus name, documents, fallback note)`` of a calibration spec; None is the default corpus.

    The default is ``c4`` when the C4 sample is found, else CPython's documentation, with a warning
    that says how to supply C4; the note (None without a fallback) goes into the artifact's record."""
    if spec is not None:
        return spec, resolve_calib_texts(spec), None
    try:
        return DEFAULT_CALIB, resolve_calib_texts(DEFAULT_CALIB), None
    except DataError as e:
        log.warning("no calibration corpus named and the C4 sample was not found (%s); calibrating on CPython's "
                    "documentation instead. Pass --calib c4:PATH, a .jsonl/.txt/.parquet file, or "
                    "hf:allenai/c4:en:validation for a representative corpus", e)
        return FALLBACK_CALIB, resolve_calib_texts(FALLBACK_CALIB), f"{DEFAULT_CALIB} not found; used {FALLBACK_CALIB}"


def calibration_tokens(
    tokenizer: Any, texts: list[str], n_samples: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """GPTQ-style calibration batch, a LongTensor of shape (n_samples, seq_len).

    Documents are tokenized without special tokens. When at least ``n_samples`` documents are
    longer than ``seq_len`` tokens, each sample is (as in GPTQ's ``get_c4``) a uniformly chosen long
    document and a uniform window ``ids[i : i + seq_len]``, ``i ∈ [0, len - seq_len - 1]``. Otherwise
    the documents, shuffled, are joined with ``"\\n\\n"`` into one token stream and each sample is a
    uniform window of it. All draws use ``random.Random(seed)``: the same inputs give the same batch.
    """
    if n_samples < 1 or seq_len < 1:
        raise DataError(f"n_samples={n_samples} and seq_len={seq_len} must both be >= 1")
    docs = [t for t in texts if t.strip()]
    if not docs:
        raise DataError(
            f"calibration text is empty ({len(texts)} documents, all blank); "
            "give a corpus with text (e.g. --calib c4 or --calib python-docs)"
        )
    rng = random.Random(seed)
    enc: list[list[int]] = tokenizer(docs, add_special_tokens=False)["input_ids"]
    long_docs = [ids for ids in enc if len(ids) > seq_len]
    rows: list[list[int]] = []
    if len(long_docs) >= n_samples:
        for _ in range(n_samples):
            ids = long_docs[rng.randrange(len(long_docs))]
            i = rng.randint(0, len(ids) - seq_len - 1)
            rows.append(ids[i : i + seq_len])
        mode = f"windows of {len(long_docs)} long documents"
    else:
        order = list(range(len(docs)))
        rng.shuffle(order)
        joined = "\n\n".join(docs[k] for k in order)
        stream: list[int] = tokenizer(joined, add_special_tokens=False)["input_ids"]
        if len(stream) < seq_len:
            raise DataError(
                f"calibration text too short: {len(docs)} documents, {sum(map(len, docs))} characters, "
                f"{len(stream)} tokens, but one sample needs seq_len={seq_len} tokens; "
                "give more text or lower the sequence length"
            )
        if len(stream) < n_samples * seq_len:
            log.warning(
                "calibration stream has %d tokens < %d samples x %d: samples will overlap",
                len(stream), n_samples, seq_len,
            )
        for _ in range(n_samples):
            i = rng.randint(0, len(stream) - seq_len)
            rows.append(stream[i : i + seq_len])
        mode = f"windows of one {len(stream)}-token stream of {len(docs)} documents"
    log.info("calibration: %d x %d tokens, %s (seed %d)", n_samples, seq_len, mode, seed)
    return torch.tensor(rows, dtype=torch.long)  # type: ignore[return-value]
