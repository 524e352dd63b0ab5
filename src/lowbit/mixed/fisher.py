"""How much the model's output distribution cares about each weight: the diagonal of the Fisher information.

At the float model the KL divergence ``KL(P || P_theta+d)`` has zero gradient and the Fisher information
``F = E[grad log p(y) grad log p(y)^T]`` (``y`` sampled *from the model*) as its Hessian, so to second order

    KLD(d)  ~=  1/2 d^T F d.

Quantization errors ``d = dW`` are close to independent and zero-mean from weight to weight, and then the
off-diagonal terms of ``F`` cancel in expectation: ``E[d^T F d] = sum_i F_ii d_i^2``. So the estimate per
scored token (``N`` of them) is

    KLD(dW)  ~=  1/(2N) sum_oj F_oj dW_oj^2        F_oj = sum_s (dL_s / dW_oj)^2

with ``L_s`` the log-likelihood of sequence ``s`` summed over its scored positions, labels sampled from the
model's own distribution, and ``dL_s / dW = sum_t g_t x_t^T`` (``g_t``: gradient at the linear's output, ``x_t``:
its input at position t). Summing over positions *before* squaring keeps the cancellations between positions;
squaring per position (``sum_t g_t^2 x_t^2``) overestimated single-tensor KLD about 50-fold on Gemma-3-270M and
ranked the tensors poorly.

Collected in one forward and one backward pass per calibration sequence, with hooks: no parameter requires
grad, each linear's weight gradient is formed in its output's gradient hook as ``g^T x``, squared and added
(``F`` is weight-sized, float32). The input embedding's rows get the gradient at its output (times its scale:
Gemma multiplies rows by sqrt(hidden)); with tied embeddings that adds to the head's gradient before squaring
(one tensor). Also kept: ``E[x^2] (in,)`` of every linear's input (the importance matrix). Scored positions: a
seeded random ``fraction`` of each sequence's positions after the first (``logits_to_keep``: the head, the
largest matmul of small models, runs on those only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.core.progress import progress as ticker
from lowbit.models.archs import get_arch
from lowbit.pipeline.quantize import named_linears

log = logging.getLogger(__name__)


@dataclass
class FisherStats:
    """``fisher[name] (out, in)``: ``F / N`` (see the module docstring) of every block linear, the head and the
    input embedding (keyed by module name; a tied head and embedding share one entry, the embedding's);
    ``act2[name] (in,)``: ``E[x^2]`` of each linear's input; over ``tokens`` scored tokens."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    act2: dict[str, torch.Tensor] = field(default_factory=dict)
    head: str = "lm_head"
    embed: str = "model.embed_tokens"
    tied: bool = True
    tokens: int = 0
    sequences: int = 0


class _Linear:
    """Running sums of one linear: ``F`` (sum over sequences of the squared weight gradient) and ``x^2``."""

    def __init__(self, out: int, inp: int) -> None:
        self.F = torch.zeros(out, inp)
        self.x2 = torch.zeros(inp, dtype=torch.float64)
        self.x: torch.Tensor | None = None
        self.G: torch.Tensor | None = None  # this sequence's weight gradient, when it is squared later

    def forward(self, x: torch.Tensor) -> None:
        self.x = x.detach().reshape(-1, x.shape[-1]).float()
        self.x2 += self.x.square().sum(0).double().cpu()

    def backward(self, g: torch.Tensor, defer: bool = False) -> None:
        assert self.x is not None
        G = g.detach().reshape(-1, g.shape[-1]).float().T @ self.x  # (out, in)
        self.x = None
        if defer:
            self.G = G.cpu()
        else:
            self.F += G.square().cpu()

    def settle(self) -> None:
        if self.G is not None:
            self.F += self.G.square()
            self.G = None


def _embed_scale(model: Any) -> float:
    s = getattr(model.get_input_embeddings(), "embed_scale", None)
    return float(s) if s is not None else 1.0


def collect_fisher(model: Any, tokens: torch.Tensor, *, fraction: float = 0.5, seed: int = 0,
                   progress: bool = True) -> FisherStats:
    """Fisher statistics of ``model`` (float, on the CPU or one device) over ``tokens (n, T)``."""
    spec = get_arch(model)
    linears = dict(named_linears(model, spec))
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    tied = head.weight is emb.weight
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    acc = {n: _Linear(lin.out_features, lin.in_features) for n, lin in {**linears, head_name: head}.items()}
    emb_F = None if tied else torch.zeros_like(emb.weight, dtype=torch.float32, device="cpu")
    scale = _embed_scale(model)
    ids_now: list[torch.Tensor] = []

    def lin_hook(a: _Linear, defer: bool = False) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            a.forward(args[0])
            if out.requires_grad:
                out.register_hook(lambda g: a.backward(g, defer))
        return fn

    def emb_backward(g: torch.Tensor) -> None:
        ids, inv = torch.unique(ids_now[0], return_inverse=True)
        rows = torch.zeros(len(ids), g.shape[-1]).index_add_(0, inv, g.detach()[0].float().cpu() * scale)
        if tied:  # one tensor: the head's gradient and the embedding's add before squaring
            G = acc[head_name].G
            assert G is not None
            G.index_add_(0, ids, rows)
        else:
            assert emb_F is not None
            emb_F.index_add_(0, ids, rows.square())

    def emb_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.detach().requires_grad_()
        out.register_hook(emb_backward)
        return out

    handles = [lin.register_forward_hook(lin_hook(acc[n])) for n, lin in linears.items()]
    handles.append(head.register_forward_hook(lin_hook(acc[head_name], defer=tied)))
    handles.append(emb.register_forward_hook(emb_hook))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    n_tok = 0
    try:
        with ticker(f"Fisher statistics on {tokens.shape[0]} sequences", tokens.shape[0], progress) as bar:
            for i in range(tokens.shape[0]):
                ids = tokens[i:i + 1].to(dev)
                T = ids.shape[1]
                k = max(1, int(round((T - 1) * fraction)))
                keep = torch.sort(torch.randperm(T - 1, generator=gen)[:k] + 1).values  # among positions 1..T-1
                ids_now[:] = [ids[0].cpu()]
                lp = torch.log_softmax(model(input_ids=ids, logits_to_keep=keep.to(dev)).logits[0].float(), -1)
                y = torch.multinomial(lp.detach().exp().cpu(), 1, generator=gen).squeeze(1).to(dev)
                (-lp.gather(1, y[:, None]).sum()).backward()
                acc[head_name].settle()
                n_tok += k
                bar.advance()
    finally:
        for h in handles:
            h.remove()
        for p_, f in zip(model.parameters(), flags, strict=True):
            p_.requires_grad_(f)
    st = FisherStats(head=head_name, embed=emb_name, tied=tied, tokens=n_tok, sequences=int(tokens.shape[0]))
    n_pos = tokens.numel()
    for n, a in acc.items():
        st.fisher[emb_name if tied and n == head_name else n] = a.F / n_tok
        st.act2[n] = (a.x2 / (n_tok if n == head_name else n_pos)).float()
    if emb_F is not None:
        st.fisher[emb_name] = emb_F / n_tok
    log.info("Fisher statistics: %d sequences, %d scored tokens", tokens.shape[0], n_tok)
    return st
