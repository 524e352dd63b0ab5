"""Calibration and evaluation corpora (WikiText-2, python-docs, C4, text files) and calibration batches."""

from lowbit.data.corpora import (
    WIKITEXT2_TEST_SHA256,
    c4_texts,
    calibration_texts,
    calibration_tokens,
    default_eval_corpus,
    find_data_file,
    find_wikitext2_test,
    python_docs,
    python_docs_documents,
    resolve_calib_texts,
    resolve_eval_text,
    text_file,
    wikitext2_test,
)

__all__ = [
    "WIKITEXT2_TEST_SHA256",
    "c4_texts",
    "calibration_texts",
    "calibration_tokens",
    "default_eval_corpus",
    "find_data_file",
    "find_wikitext2_test",
    "python_docs",
    "python_docs_documents",
    "resolve_calib_texts",
    "resolve_eval_text",
    "text_file",
    "wikitext2_test",
]
