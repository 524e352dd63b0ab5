"""Prefix sharing: the requests of several documents as one token trie, run in one forward pass.

The input ids of all requests in a pack are inserted into a trie; node ``n`` holds one token at
depth ``d(n)`` (its position in every request through it) and appears once however many requests
share the prefix up to it (the choices of a question share the question; WinoGrande's two
contexts share the words before the blank, and twin documents share both contexts). Nodes are
numbered so that a parent precedes its children; the packed sequence is the nodes in that order.

With ``A[i, j] = 1`` iff node ``j`` is node ``i`` or one of its ancestors, attention restricted to
``A`` and RoPE positions ``d(n)`` give every node exactly the hidden states it has in its own
request run alone: a causal model's state at a position depends only on the tokens up to it and
their positions. So one forward of ``N`` trie nodes replaces ``sum_r len(r)`` request tokens, and
logits are computed only at the nodes that predict a continuation token (``keep``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lowbit.eval.tasks.encode import TokenRequest


@dataclass(frozen=True)
class Pack:
    """A token trie: ``ids (N,)``, ``positions (N,)``, ``parents`` (-1 for a root); ``keep (K,)`` the nodes
    whose logits are needed; per request ``rows[r] (m_r,)`` indexes ``keep`` at its scored positions."""

    ids: torch.Tensor
    positions: torch.Tensor
    parents: np.ndarray
    keep: torch.Tensor
    rows: tuple[torch.Tensor, ...]
    targets: tuple[torch.Tensor, ...]

    @property
    def n_nodes(self) -> int:
        return int(self.ids.numel())


def build_pack(requests: Sequence[TokenRequest]) -> Pack:
    """The trie of ``requests``' input ids (inserted in order) and the logits rows each request reads."""
    children: dict[tuple[int, int], int] = {}
    ids: list[int] = []
    depth: list[int] = []
    parents: list[int] = []
    paths = []
    for req in requests:
        node, path = -1, []
        for d, tok in enumerate(req.input_ids):
            child = children.get((node, tok))
            if child is None:
                child = children[(node, tok)] = len(ids)
                ids.append(tok)
                depth.append(d)
                parents.append(node)
            path.append(child)
            node = child
        paths.append(path)
    scored = [path[len(path) - len(req.targets):] for path, req in zip(paths, requests, strict=True)]
    keep = sorted({n for s in scored for n in s})
    row_of = {n: i for i, n in enumerate(keep)}
    return Pack(
        ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(depth, dtype=torch.long),
        parents=np.asarray(parents, dtype=np.int64),
        keep=torch.tensor(keep, dtype=torch.long),
        rows=tuple(torch.tensor([row_of[n] for n in s], dtype=torch.long) for s in scored),
        targets=tuple(torch.tensor(req.targets, dtype=torch.long) for req in requests),
    )


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """``A (N, N)`` bool: ``A[i, j]`` iff ``j`` is ``i`` or an ancestor of ``i`` (parents precede children)."""
    n = len(parents)
    a = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            a[i] = a[p]
        a[i, i] = True
    return a


def attention_bias(parents: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask ``(1, 1, N, N)``: 0 where :func:`ancestor_mask` allows, the dtype's min elsewhere
    (additive works for both eager and SDPA attention)."""
    allowed = torch.from_numpy(ancestor_mask(parents))
    bias = torch.zeros(allowed.shape, dtype=dtype)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[None, None]


def trie_size(requests: Sequence[TokenRequest]) -> int:
    """Nodes of the trie of ``requests`` (tokens one document adds to a pack, at most)."""
    children: dict[tuple[int, int], int] = {}
    for req in requests:
        node = -1
        for tok in req.input_ids:
            node = children.setdefault((node, tok), len(children))
    return len(children)


def plan_packs(docs: Sequence[Sequence[TokenRequest]], max_tokens: int, max_keep: int) -> list[list[int]]:
    """Consecutive documents grouped so that each group's trie has at most ``max_tokens`` nodes and at most
    ``max_keep`` scored positions (a document larger than that is a group of its own)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    tokens = keep = 0
    for i, reqs in enumerate(docs):
        t, k = trie_size(reqs), sum(len(r.targets) for r in reqs)
        if cur and (tokens + t > max_tokens or keep + k > max_keep):
            groups.append(cur)
            cur, tokens, keep = [], 0, 0
        cur.append(i)
        tokens += t
        keep += k
    if cur:
        groups.append(cur)
    return groups
