"""A static-KV-cache greedy decoder over a Llama-family Hugging Face model's own modules.

Used by the decode benchmarks: the same embedding, norms, rotary embedding, linears (whatever
runtime linears the model holds: ``nn.Linear``, lowbit's kernel linears, FP8, bitsandbytes) and MLPs
as ``model.forward``, with attention written out over a preallocated cache, so one decode step
has fixed shapes and no host synchronisation and can be captured in a CUDA graph::

    cache   K, V   (layers, 1, kv_heads, L, head_dim)   in the model's dtype
    step    ids (1, S), pos (S,)  ->  logits (1, vocab) of the last position
            K[:, :, pos] = k;  attention of each query i over cache slots j <= pos[i]

``tests/test_kernels.py`` checks its logits against ``model(ids).logits`` on a tiny Llama.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_DECODERS: dict[tuple, tuple] = {}


class StaticDecoder:
    """Greedy decoding of batch 1 with a static cache of ``max_len`` positions."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.rope = apply_rotary_pos_emb
        self.model = model
        inner = model.model
        cfg = model.config
        self.layers = list(inner.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = inner.embed_tokens.weight
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.slots = torch.arange(max_len, device=p.device)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, vocab)`` after the tokens ``ids (1, S)`` at positions ``pos (S,)``."""
        inner = self.model.model
        h = inner.embed_tokens(ids)
        s = ids.shape[1]
        cos, sin = inner.rotary_emb(h, pos[None, :])
        mask = self.slots[None, :] <= pos[:, None]  # (S, L): query i sees cache slots j <= pos[i]
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, s, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            self.k[li].index_copy_(2, pos, k.to(self.k.dtype))
            self.v[li].index_copy_(2, pos, v.to(self.v.dtype))
            o = F.scaled_dot_product_attention(q, self.k[li], self.v[li], attn_mask=mask, enable_gqa=True)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, s, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(inner.norm(h[:, -1:]))[:, -1]

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run ``prompt (1, P)``; returns the first generated token ``(1, 1)``."""
        pos = torch.arange(prompt.shape[1], device=prompt.device)
        return self.step(prompt, pos).argmax(-1, keepdim=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def decode_tokens_per_s(model: nn.Module, prompt_len: int, new: int, *, graphs: bool, runs: int = 2,
                        seed: int = 0, compile: bool = False) -> dict:
    """Greedy decode of ``new`` tokens after a random ``prompt_len`` prompt; median tokens/s over ``runs``.

    On CUDA with ``graphs`` the decode step (fixed shapes) is captured once in a CUDA graph and
    replayed; with ``compile`` the one-token step goes through ``torch.compile`` (compiled before
    timing); prefill runs eagerly. Returns tokens/s, prefill seconds, the mode used and the tokens.
    """
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(dev)
    key = (id(model), prompt_len + new, compile)
    if key not in _DECODERS:  # reuse the cache tensors and the compiled step across calls
        d = StaticDecoder(model, prompt_len + new)
        _DECODERS[key] = (d, torch.compile(d.step, dynamic=False) if compile else d.step)
    dec, fn = _DECODERS[key]
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)

    def one_step() -> None:
        tok.copy_(fn(tok, pos).argmax(-1, keepdim=True))
        pos.add_(1)

    step: Callable[[], None] = one_step
    mode = "compiled" if compile else "eager"
    if compile:  # compile outside the timed loop (the cache is rewritten by the prefill below)
        tok.copy_(dec.prefill(prompt))
        pos.fill_(prompt_len)
        t0 = time.perf_counter()
        one_step()
        mode += f" ({time.perf_counter() - t0:.0f} s to compile)"
    if graphs and dev.type == "cuda":
        try:
            step, same = _capture(one_step, tok, pos, dec, prompt)
            mode = "cuda-graph" + ("" if same else " (first replayed token differs from the eager one)")
        except RuntimeError as e:  # capture refused by some op: report it and time eagerly
            mode = f"eager (graph capture failed: {str(e).splitlines()[0][:120]})"
            torch.cuda.synchronize(dev)
    rates, prefills, tokens = [], [], []
    for _ in range(runs):
        sync(dev)
        t0 = time.perf_counter()
        tok.copy_(dec.prefill(prompt))
        sync(dev)
        prefills.append(time.perf_counter() - t0)
        pos.fill_(prompt_len)
        out = [tok.clone()]
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(new - 1):
            step()
            out.append(tok.clone())
        sync(dev)
        rates.append((new - 1) / (time.perf_counter() - t0))
        tokens = torch.cat(out, 1)[0].tolist()
    return {"tokens_per_s": statistics.median(rates), "runs_tokens_per_s": rates,
            "prefill_s": statistics.median(prefills), "mode": mode, "tokens": tokens[:16]}


def _capture(one_step: Callable[[], None], tok: torch.Tensor, pos: torch.Tensor, dec: StaticDecoder,
             prompt: torch.Tensor) -> tuple[Callable[[], None], bool]:
    """Warm up ``one_step`` on a side stream, capture it; whether one replay gives the eager step's token."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tok.copy_(dec.prefill(prompt))
        pos.fill_(prompt.shape[1])
        for _ in range(3):
            one_step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    tok.copy_(dec.prefill(prompt))
    pos.fill_(prompt.shape[1])
    with torch.cuda.graph(g):
        one_step()
    # check: one replay from a fresh prefill gives the token an eager step gives
    tok.copy_(dec.prefill(prompt))
    pos.fill_(prompt.shape[1])
    one_step()
    eager_tok = tok.clone()
    tok.copy_(dec.prefill(prompt))
    pos.fill_(prompt.shape[1])
    g.replay()
    torch.cuda.synchronize()
    return g.replay, bool(torch.equal(tok, eager_tok))
