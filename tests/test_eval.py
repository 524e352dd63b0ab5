"""Tests of lowbit.eval.perplexity against a plain transformers GPTQ loop (tiny random Llama, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.core.errors import DataError
from lowbit.eval import evaluate, make_windows

VOCAB = 300


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, VOCAB, (5 * 64 + 17,), generator=g)


def gptq_reference_ppl(model: LlamaForCausalLM, ids: torch.Tensor, ctx: int) -> float:
    """The canonical GPTQ evaluation loop."""
    ids = ids.unsqueeze(0)
    nsamples = ids.shape[1] // ctx
    nlls = []
    loss_fct = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        for i in range(nsamples):
            batch = ids[:, i * ctx : (i + 1) * ctx]
            logits = model(batch).logits
            loss = loss_fct(logits[:, :-1, :].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            nlls.append(loss.float() * ctx)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * ctx)).item()


def test_gptq_ppl_matches_canonical_loop(model, ids):
    ctx = 64
    res = evaluate({"m": model}, ids, "gptq", ctx, progress=False)["m"]
    want = gptq_reference_ppl(model, ids, ctx)
    assert res.n_windows == 5 and res.n_tokens == 5 * (ctx - 1)
    assert res.kld_mean is None and res.top1 is None
    assert abs(res.ppl - want) / want < 1e-4
    assert math.isclose(res.ppl, math.exp(res.nll))
    assert res.to_dict()["protocol"] == "gptq"


def test_kld_self_zero_and_perturbed_positive(model, ids):
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        w = noisy.model.layers[0].mlp.down_proj.weight
        w.add_(0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
    out = evaluate(
        {"ref": model, "same": model, "noisy": noisy}, ids, "gptq", 64, max_windows=3,
        reference="ref", progress=False,
    )
    assert list(out) == ["ref", "same", "noisy"]
    assert out["ref"].kld_mean is None and out["ref"].reference == "ref"
    assert out["same"].kld_mean == pytest.approx(0.0, abs=1e-6)
    assert out["same"].top1 == 1.0 and out["same"].ppl == pytest.approx(out["ref"].ppl, rel=1e-6)
    assert out["noisy"].kld_mean is not None and out["noisy"].kld_mean > 1e-6
    assert out["noisy"].kld_p99 is not None and out["noisy"].kld_p99 >= out["noisy"].kld_mean
    assert out["noisy"].top1 is not None and out["noisy"].top1 < 1.0
    assert all(r.n_windows == 3 and r.n_tokens == 3 * 63 for r in out.values())


def test_callable_model_matches_module(model, ids):
    fn = lambda x: model(x).logits  # noqa: E731
    a = evaluate({"mod": model, "fn": fn}, ids, "gptq", 64, max_windows=2, reference="mod", progress=False)
    assert a["fn"].ppl == pytest.approx(a["mod"].ppl, rel=1e-6)
    assert a["fn"].kld_mean == pytest.approx(0.0, abs=1e-6)


def test_llamacpp_protocol_scores_second_half(model, ids):
    ctx = 64
    seen: list[torch.Tensor] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return model(x).logits

    res = evaluate({"m": fn}, ids, "llamacpp", ctx, progress=False, bos_token_id=1)["m"]
    first = ctx // 2
    assert res.n_windows == 5 and res.n_tokens == 5 * (ctx - first - 1) == 5 * 31
    assert all(int(x[0, 0]) == 1 for x in seen)
    assert torch.equal(seen[1][0, 1:], ids[ctx + 1 : 2 * ctx])
    # manual: logits at first..ctx-2 predict tokens first+1..ctx-1
    nll, n = 0.0, 0
    with torch.no_grad():
        for x in seen:
            logp = torch.log_softmax(model(x).logits[0].float(), -1)
            tgt = x[0, first + 1 :]
            nll -= logp[first:-1].gather(-1, tgt[:, None]).sum().item()
            n += tgt.numel()
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    w = make_windows(ids, "llamacpp", ctx)
    assert [x.n_scored for x in w] == [31] * 5 and int(w[0].input_ids[0, 0]) == int(ids[0])


def test_short_text_and_bad_args(model):
    with pytest.raises(DataError, match="too short"):
        evaluate({"m": model}, torch.arange(2, 40), "gptq", 64, progress=False)
    with pytest.raises(DataError):
        make_windows(torch.arange(10), "llamacpp", 512)
    with pytest.raises(Exception, match="reference"):
        evaluate({"m": model}, torch.arange(2, 200), "gptq", 64, reference="x", progress=False)
    bad = lambda x: torch.zeros(1, x.shape[1] - 1, VOCAB)  # noqa: E731
    with pytest.raises(Exception, match="logits"):
        evaluate({"bad": bad}, torch.arange(2, 200), "gptq", 64, progress=False)
