"""Documents from a user's corpus, streamed: JSON lines, parquet, plain text, and Hugging Face datasets.

A corpus of any size is read one record at a time and never held whole: :func:`sample_documents`
keeps a seeded reservoir sample of at most ``cap`` documents (Vitter's algorithm R), in file order
when the corpus has no more than ``cap`` (then every document, exactly as a full read would give).

Sources:

=============================== ==========================================================
``PATH.jsonl``                  one JSON object per line with a string field ``text``
``PATH.parquet``                a ``text`` column (pyarrow, the ``data`` extra)
``PATH`` (any other file)       UTF-8 text: one document per blank-line-separated paragraph
                                block of at most ``_BLOCK`` characters
``hf:NAME[:CONFIG[:SPLIT]]``    a Hugging Face dataset's ``text`` column through ``datasets``
                                (the ``data`` extra; cached; needs the hub the first time)
=============================== ==========================================================
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowbit.core.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_CAP = 20_000  # documents kept for calibration: GPTQ-style sampling draws from these
_BLOCK = 1 << 20  # plain text: documents of at most ~1 MB of characters
HF_PREFIX = "hf:"


def iter_jsonl(p: Path) -> Iterator[str]:
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p} line {n} is not JSON ({e}); write one JSON object per line") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{p} line {n} has no string field 'text'; each line needs {{\"text\": ...}}")
            yield obj["text"]


def iter_parquet(p: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{p}: reading parquet needs pyarrow: pip install 'lowbit[data]'") from e
    try:
        f = pq.ParquetFile(str(p))
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a bad file
        raise DataError(f"{p} is not a readable parquet file ({e})") from e
    if "text" not in f.schema_arrow.names:
        raise DataError(f"{p} has no 'text' column (columns: {', '.join(f.schema_arrow.names)})")
    for batch in f.iter_batches(columns=["text"], batch_size=1024):
        for t in batch.column(0).to_pylist():
            if isinstance(t, str):
                yield t


def iter_text(p: Path) -> Iterator[str]:
    """Paragraph blocks of a UTF-8 text file, read a line at a time."""
    buf: list[str] = []
    size = 0
    try:
        with p.open(encoding="utf-8") as f:
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= _BLOCK and not line.strip():
                    yield "".join(buf)
                    buf, size = [], 0
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text ({e}); convert it to UTF-8") from e
    if buf:
        yield "".join(buf)


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` -> (name, config, split); the split defaults to ``train``."""
    parts = spec[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"{spec!r}: write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT "
                        "(e.g. hf:allenai/c4:en:validation, hf:wikitext:wikitext-2-raw-v1:test)")
    name = parts[0]
    config = parts[1] or None if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def iter_hf(spec: str) -> Iterator[str]:
    name, config, split = parse_hf(spec)
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{spec}: Hugging Face datasets need the datasets package: pip install 'lowbit[data]'") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 -- hub, network and config errors come in many types
        raise DataError(f"{spec}: datasets could not load {name} (config {config}, split {split}): {e}. Offline? "
                        "Pass a local .jsonl/.parquet/.txt file instead") from e
    if "text" not in ds.column_names:
        raise DataError(f"{spec} has no 'text' column (columns: {', '.join(ds.column_names)})")
    for t in ds["text"]:
        if isinstance(t, str):
            yield t


def iter_documents(spec: str) -> tuple[str, Iterator[str]]:
    """(label, document iterator) of a path or ``hf:`` spec (see the module docstring)."""
    if spec.startswith(HF_PREFIX):
        parse_hf(spec)
        return spec, iter_hf(spec)
    p = Path(spec).expanduser()
    if not p.is_file():
        raise DataError(f"{spec!r} is not an existing file; check the path")
    if p.suffix == ".jsonl":
        return f"file:{p.name}", iter_jsonl(p)
    if p.suffix == ".parquet":
        return f"file:{p.name}", iter_parquet(p)
    return f"file:{p.name}", iter_text(p)


def sample_documents(docs: Iterator[str], cap: int = DEFAULT_CAP, seed: int = 0) -> tuple[list[str], int]:
    """A seeded reservoir sample of at most ``cap`` non-blank documents (all of them, in order, when there
    are no more than ``cap``), and how many there were."""
    rng = random.Random(seed)
    keep: list[str] = []
    n = 0
    for d in docs:
        if not d.strip():
            continue
        n += 1
        if len(keep) < cap:
            keep.append(d)
        else:
            j = rng.randrange(n)
            if j < cap:
                keep[j] = d
    return keep, n


def read_text_prefix(spec: str, max_chars: int | None = None) -> tuple[str, str]:
    """(label, text) of an evaluation corpus from a path or ``hf:`` spec, documents joined with ``"\\n\\n"``
    (a plain file as it is); at most ``max_chars`` characters are read when given."""
    label, it = iter_documents(spec)
    plain = not spec.startswith(HF_PREFIX) and Path(spec).suffix not in (".jsonl", ".parquet")
    sep = "" if plain else "\n\n"
    out: list[str] = []
    size = 0
    for d in it:
        out.append(d)
        size += len(d) + len(sep)
        if max_chars is not None and size >= max_chars:
            break
    text = sep.join(out)
    return label, text if max_chars is None else text[:max_chars]
