"""Evaluation: streamed perplexity, KL divergence and top-1 agreement against a reference."""

from lowbit.eval.perplexity import EvalResult, Window, adds_bos, evaluate, make_windows, tokenize_corpus

__all__ = ["EvalResult", "Window", "adds_bos", "evaluate", "make_windows", "tokenize_corpus"]
