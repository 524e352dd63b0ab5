"""Zero-shot task scoring on tiny random models against a brute-force computation.

The brute force restates lm-eval's loglikelihood from scratch: per request, ``whole = encode(ctx +
cont)``, ``ctx_ids = encode(ctx)`` (trailing spaces of the context moved to the continuation), one
forward of ``(ctx_ids + cont_ids)[:-1]`` alone, the full log-softmax in float64, the sum over the
continuation tokens. Tolerances: the packed forward differs from a lone forward only by float32
reassociation (logits ~1e-6 relative, log-probs ~1e-5 per token with these O(1) logits, at most
~20 continuation tokens here), so 1e-3 nats has ample margin, while a wrong mask or a wrong
position moves a log-likelihood by far more (> 0.1 on these models, asserted below).
"""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_model_dir
from lowbit.eval.tasks import evaluate_tasks, load_tasks
from lowbit.eval.tasks.encode import Encoder, TokenRequest
from lowbit.eval.tasks.metrics import choose, mean_stderr, perplexity, perplexity_stderr
from lowbit.eval.tasks.packing import ancestor_mask, build_pack, plan_packs
from lowbit.eval.tasks.scorer import PackedScorer, PlainScorer, make_scorer
from tasks_data import task_specs, write_task_files

ATOL = 1e-3


def _load(path, sliding: int | None = None):  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if sliding is not None:
        model.config.sliding_window = sliding
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # type: ignore[no-untyped-def]
    return write_task_files(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    path = make_tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param, max_position_embeddings=512)
    # gemma3's tiny sliding window (32) is shorter than these requests; widen it so the packed path runs
    return _load(path, sliding=1024 if request.param == "gemma3" else None)


def brute_force(model, tok, context: str, continuation: str) -> tuple[float, bool]:  # type: ignore[no-untyped-def]
    """lm-eval's loglikelihood of one request, restated: one forward, full float64 log-softmax."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    ids = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -len(cont):].double(), -1)
    target = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all())


def test_scores_match_brute_force(tiny, files):  # type: ignore[no-untyped-def]
    model, tok = tiny
    tasks = load_tasks(task_specs(files))
    res = evaluate_tasks({"m": model}, tok, tasks, progress=False)["m"]
    for task in tasks:
        r = res[task.name]
        assert r.scorer == "packed" and r.n_docs == len(task.docs) == 3
        if task.name in ("hellaswag", "arc_easy"):
            assert r.tokens < 0.8 * r.tokens_unshared  # each question ran once for its choices
        accs = []
        for d, doc in enumerate(task.docs):
            want = [brute_force(model, tok, c, x) for c, x in doc.requests]
            assert np.allclose(r.loglikelihoods[d], [w[0] for w in want], atol=ATOL, rtol=0), (task.name, d)
            if task.spec.output == "loglikelihood":
                assert r.predictions[d] == int(want[0][1])
                accs.append(float(want[0][1]))
            else:
                pred, pred_norm = choose([w[0] for w in want], doc.choices)
                assert r.predictions[d] == pred
                assert r.predictions_norm is None or r.predictions_norm[d] == pred_norm
                accs.append(float(pred == doc.gold))
        assert r.metrics["acc"] == pytest.approx(sum(accs) / len(accs))
        assert r.stderr["acc"] == pytest.approx(statistics.stdev(accs) / math.sqrt(len(accs)))
    lls = [ll[0] for ll in res["lambada_openai"].loglikelihoods]
    assert res["lambada_openai"].metrics["perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)))


def test_packed_equals_plain_and_a_wrong_mask_would_show(tiny, files):  # type: ignore[no-untyped-def]
    model, tok = tiny
    enc = Encoder(tok, 512)
    tasks = load_tasks(task_specs(files))
    reqs = [enc.encode(c, x) for t in tasks for d in t.docs for c, x in d.requests]
    with torch.inference_mode():
        packed = PackedScorer(model).score(reqs)
        plain = PlainScorer(model).score(reqs)
        # the same trie without a mask (plain causal attention over the packed sequence) is far off
        pack = build_pack(reqs[:8])
        wrong = model(pack.ids[None], position_ids=pack.positions[None]).logits[0, pack.keep]
    assert [p[1] for p in packed] == [p[1] for p in plain]
    assert max(abs(a[0] - b[0]) for a, b in zip(packed, plain, strict=True)) < ATOL
    from lowbit.eval.tasks.scorer import score_rows

    off = score_rows(wrong, pack.rows, pack.targets)
    assert max(abs(a[0] - b[0]) for a, b in zip(off, plain[:8], strict=True)) > 0.1


def test_sliding_window_shorter_than_a_request_scores_plainly(tmp_path, files):  # type: ignore[no-untyped-def]
    model, tok = _load(make_tiny_model_dir(tmp_path / "g", "gemma3", max_position_embeddings=512))  # window 32
    res = evaluate_tasks({"m": model}, tok, [f"hellaswag={files['hellaswag']}"], progress=False)["m"]["hellaswag"]
    doc = load_tasks([f"hellaswag={files['hellaswag']}"])[0].docs[0]
    want = [brute_force(model, tok, c, x)[0] for c, x in doc.requests]
    assert np.allclose(res.loglikelihoods[0], want, atol=ATOL, rtol=0)
    assert res.tokens == res.tokens_unshared  # every request ran alone, with the model's own window mask


def test_any_callable_is_scored_plainly(files, tmp_path):  # type: ignore[no-untyped-def]
    model, tok = _load(make_tiny_model_dir(tmp_path / "l", "llama", max_position_embeddings=512))
    fn = lambda ids: model(ids).logits  # noqa: E731  (a bare ids -> logits callable)
    assert isinstance(make_scorer(fn), PlainScorer) and isinstance(make_scorer(model), PackedScorer)
    specs = task_specs(files)
    a = evaluate_tasks({"fn": fn, "hf": model}, tok, specs, progress=False, reference="hf")
    for name, r in a["fn"].items():
        assert r.scorer == "plain" and r.agreement == 1.0
        assert np.allclose(np.concatenate(r.loglikelihoods), np.concatenate(a["hf"][name].loglikelihoods),
                           atol=ATOL, rtol=0)
        assert all(abs(v) < 1e-12 for v in (r.difference or {}).values())


def test_trie_shares_prefixes_and_masks_ancestors() -> None:
    reqs = [TokenRequest((5, 6, 7, 8), (8, 9)), TokenRequest((5, 6, 7, 3), (3,)), TokenRequest((4, 6), (6, 1))]
    pack = build_pack(reqs)
    assert pack.ids.tolist() == [5, 6, 7, 8, 3, 4, 6]  # 5-6-7 shared by the first two requests
    assert pack.positions.tolist() == [0, 1, 2, 3, 3, 0, 1]
    a = ancestor_mask(pack.parents)
    assert a[4].tolist() == [True, True, True, False, True, False, False]  # "3" sees 5 6 7, not its sibling 8
    assert a[6].tolist() == [False] * 5 + [True, True]
    # request 0 scores the nodes of its last 2 inputs (7, 8); request 2 those of (4, 6)
    assert pack.keep[pack.rows[0]].tolist() == [2, 3] and pack.keep[pack.rows[2]].tolist() == [5, 6]
    assert pack.targets[1].tolist() == [3]
    groups = plan_packs([[reqs[0], reqs[1]], [reqs[2]], [reqs[2]]], max_tokens=6, max_keep=100)
    assert groups == [[0], [1, 2]]  # 5 + 2 nodes > 6; 2 + 2 fit


def test_encoder_follows_lm_eval(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, tok = _load(make_tiny_model_dir(tmp_path / "l", "llama"))
    enc = Encoder(tok, 512)
    ctx, cont = enc.encode_pair("the quick brown ", "fox")  # trailing space moves to the continuation
    assert ctx == tok.encode("the quick brown") and ctx + cont == tok.encode("the quick brown fox")
    ctx, cont = enc.encode_pair("", " fox")  # empty context: the prefix token (BOS here)
    assert ctx == [tok.bos_token_id] and cont == tok.encode(" fox", add_special_tokens=False)
    long = enc.encode("the " * 600, "fox")
    ctx, cont = enc.encode_pair("the " * 600, "fox")
    assert long.input_ids == tuple((ctx + cont)[-513:-1]) and long.targets == tuple(cont)  # left-truncated


def test_metrics_as_lm_eval() -> None:
    assert choose([-3.0, -1.0, -1.0], ["a", "b", "cc"]) == (1, 2)  # ties: the first; norm by characters
    xs = [1.0, 0.0, 1.0, 1.0]
    assert mean_stderr(xs) == pytest.approx(statistics.stdev(xs) / 2)
    lls = [-2.5, -0.5, -7.25, -1.0, -3.0]

    def lm_eval_bootstrap(iters: int) -> float:  # lm_eval.api.metrics.bootstrap_stderr, restated
        res = []
        for i in range(iters // 1000):
            rnd = random.Random(i)
            res += [perplexity(rnd.choices(lls, k=len(lls))) for _ in range(1000)]
        return statistics.stdev(res)

    assert perplexity_stderr(lls, 3000) == pytest.approx(lm_eval_bootstrap(3000), rel=1e-9)


def test_llamacpp_gguf_reuses_the_shared_prefix(tmp_path, files):  # type: ignore[no-untyped-def]
    """A GGUF through llama.cpp: the KV cache of a shared context is reused, the scores are llama.cpp's own
    one-sequence-at-a-time scores (1e-3: another split into batches) and transformers' within its F32
    file's error (the KV cache is f16 in llama.cpp: ~1e-3 relative per logit, summed over <= 20 tokens)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:  # CI installs it (scripts/install_llamacpp.sh): a missing client is a failure
        raise AssertionError("llama-cpp-python is required for the GGUF tests (see .ci/run)") from e
    from lowbit.eval.llamacpp import LlamaCppLogits
    from lowbit.formats.gguf.writer import write_gguf

    folder = make_tiny_model_dir(tmp_path / "l", "llama", max_position_embeddings=512)
    model, tok = _load(folder)
    gguf = LlamaCppLogits(write_gguf(folder, tmp_path / "m.gguf", "F32").path, ctx=512, threads=1)
    specs = task_specs(files)
    res = evaluate_tasks({"hf": model, "gguf": gguf, "plain": gguf.__call__}, tok, specs, progress=False,
                         reference="hf")
    for name, r in res["gguf"].items():
        shared = r.tokens < r.tokens_unshared if name != "lambada_openai" else r.tokens == r.tokens_unshared
        assert r.scorer == "llama.cpp" and shared, name  # LAMBADA: one request a document, nothing shared
        plain = np.concatenate(res["plain"][name].loglikelihoods)
        assert np.allclose(np.concatenate(r.loglikelihoods), plain, atol=1e-3, rtol=0), name
        assert np.allclose(plain, np.concatenate(res["hf"][name].loglikelihoods), atol=2e-2, rtol=0), name
    gguf.close()


@pytest.mark.slow
def test_smollm2_packed_equals_one_forward_per_request() -> None:
    """SmolLM2-135M on the first documents of the shared data files: prefix-shared packs give lm-eval's
    one-forward-per-request log-likelihoods (float32 reassociation only) and the same answers."""
    from lowbit.models.loader import load_model

    lm = load_model("smollm2-135m")
    tasks = load_tasks(["hellaswag", "arc_easy", "piqa", "winogrande"], limit=5)
    enc = Encoder(lm.tokenizer, 8192)
    for task in tasks:
        reqs = [enc.encode(c, x) for d in task.docs for c, x in d.requests]
        with torch.inference_mode():
            packed = PackedScorer(lm.model).score(reqs)
            plain = PlainScorer(lm.model).score(reqs)
        assert max(abs(a[0] - b[0]) for a, b in zip(packed, plain, strict=True)) < ATOL, task.name
        assert [a[1] for a in packed] == [b[1] for b in plain]
