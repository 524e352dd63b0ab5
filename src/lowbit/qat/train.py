"""The QAT training loop: knowledge distillation (or next-token loss), AdamW, checkpoints, resume.

Loss per batch of token windows ``ids (B, T)``, over every position ``t`` (vocabulary ``V``)::

    kd:  KL(p_teacher || p_student) = sum_v p_t[v] (log p_t[v] - log p_s[v]),   averaged over B*T
    ce:  -log p_s[ids[t+1]],                                                     averaged over B*(T-1)

with ``p = softmax(logits)`` (the teacher is the float model). AdamW (betas 0.9/0.95, no weight decay by
default) with three parameter groups, each with its own learning rate: latent weights, scales, zero
points; the rate warms up linearly over the first ``warmup`` fraction of the steps, then follows a
cosine to zero; gradients are clipped to ``max_grad_norm``.

The forward passes run under ``torch.autocast`` (bfloat16 matmuls by default: twice the float32 rate on
CPUs with AVX-512 BF16 or AMX, and the usual choice on GPUs); parameters, optimizer state, the fake-quant
arithmetic and the loss stay float32. The fake-quant kernels run compiled (``torch.compile``, one fused
loop per pass) unless ``compile`` is off.

Batches are fixed by the seed: epoch ``e`` visits the training windows in the order of a permutation
drawn from ``seed + e``, so step ``k`` always sees the same windows, and a run resumed from a
checkpoint (trainable tensors, optimizer and schedule state, the log) continues exactly as the
uninterrupted run would. A checkpoint refuses to resume a different run (configuration, training
tokens or starting weights differ).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.qat.fakequant import FakeQuantLinear, compiled

log = logging.getLogger("lowbit.qat")

LOSSES = ("kd", "ce")
CHECKPOINT_FILE = "qat_checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """How the fake-quant model trains (what it trains is fixed by :func:`lowbit.qat.prepare`)."""

    steps: int = 300
    lr: float = 1e-5  # latent weights
    scale_lr: float = 1e-4  # scales
    zero_lr: float = 1e-3  # zero points (float, rounded in the forward pass: they move by whole steps)
    batch_size: int = 1
    warmup: float = 0.05  # fraction of the steps
    loss: str = "kd"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    grad_checkpointing: bool = False
    autocast: str | None = "bfloat16"  # matmuls in this dtype (torch.autocast); None: the model's dtype
    compile: bool = True  # the fake-quant kernels through torch.compile (eager where that fails)
    checkpoint_every: int = 0  # steps; 0: no checkpoints
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise LowbitError(f"steps ({self.steps}) must be >= 0 and batch size ({self.batch_size}) >= 1")
        if self.loss not in LOSSES:
            raise LowbitError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if min(self.lr, self.scale_lr, self.zero_lr) < 0 or not 0 <= self.warmup < 1:
            raise LowbitError("learning rates must be >= 0 and warmup a fraction in [0, 1)")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise LowbitError(f"autocast must be bfloat16, float16 or None, got {self.autocast!r}")
        if self.checkpoint_every < 0:
            raise LowbitError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What a training run did: one entry per step (``step, loss, lr, grad_norm, seconds``)."""

    log: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0

    @property
    def steps(self) -> int:
        return len(self.log)

    def mean_loss(self, first: bool, n: int = 10) -> float | None:
        """Mean loss of the first (or last) ``n`` steps."""
        xs = [e["loss"] for e in (self.log[:n] if first else self.log[-n:])]
        return sum(xs) / len(xs) if xs else None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` per position, averaged; logits ``(..., V)``."""
    ls = F.log_softmax(student.float(), dim=-1)
    lt = F.log_softmax(teacher.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def ce_loss(student: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits ``(B, T, V)`` on ``ids (B, T)``."""
    v = student.shape[-1]
    return F.cross_entropy(student[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: latent weights, scales, zero points of every fake-quant layer (those that train)."""
    groups: dict[str, list[nn.Parameter]] = {"weights": [], "scales": [], "zeros": []}
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            for key, p in (("weights", m.weight), ("scales", m.weight_scale), ("zeros", m.weight_zero_point)):
                if isinstance(p, nn.Parameter) and p.requires_grad:
                    groups[key].append(p)
    lrs = {"weights": cfg.lr, "scales": cfg.scale_lr, "zeros": cfg.zero_lr}
    out = [{"name": k, "params": ps, "lr": lrs[k], "base_lr": lrs[k]} for k, ps in groups.items() if ps and lrs[k] > 0]
    if not out:
        raise LowbitError("nothing to train: the model has no trainable fake-quant parameters (call prepare first, "
                          "and give at least one non-zero learning rate)")
    return out


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup * steps`` steps, then a cosine from 1 to 0 (``step`` counts from 0)."""
    warm = int(cfg.warmup * cfg.steps)
    if step < warm:
        return (step + 1) / warm
    span = max(1, cfg.steps - warm)
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / span))


def batch_rows(step: int, n: int, cfg: TrainConfig) -> list[int]:
    """Indices of the training windows of ``step``: epochs of seeded permutations, read in order."""
    rows = []
    for k in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
        epoch, i = divmod(k, n)
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        rows.append(int(torch.randperm(n, generator=g)[i]))
    return rows


def fingerprint(model: nn.Module, tokens: torch.Tensor, cfg: TrainConfig) -> str:
    """sha256 of the configuration, the training tokens and the trainable tensors at the start."""
    h = hashlib.sha256(repr(sorted(cfg.to_dict().items())).encode())
    h.update(tokens.numpy().tobytes())
    for n, p in model.named_parameters():
        if p.requires_grad:
            h.update(n.encode())
            h.update(p.detach().float().numpy().tobytes())
    return h.hexdigest()


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model: nn.Module, tokens: torch.Tensor, cfg: TrainConfig, *, teacher: nn.Module | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train the fake-quant layers of ``model`` on windows ``tokens (n, T)`` for ``cfg.steps`` steps.

    ``teacher``: the float model (``cfg.loss == "kd"``). ``checkpoint_dir``: where checkpoints go every
    ``cfg.checkpoint_every`` steps; with ``resume`` a checkpoint found there is continued. ``on_step(step,
    entry)`` is called after every step (an exception there stops the run, as an interruption would).
    """
    if cfg.loss == "kd" and teacher is None:
        raise LowbitError("knowledge distillation needs the float model as teacher (or use loss 'ce')")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise LowbitError(f"training tokens must be (n, T) with T >= 2, got {tuple(tokens.shape)}")
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    fp = fingerprint(model, tokens, cfg)
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    result = TrainResult()
    start = 0
    if resume and ckpt is not None and ckpt.is_file():
        start = _restore(ckpt, model, opt, fp, result)
    elif resume:
        log.info("no checkpoint at %s: training from the start", ckpt)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    model.train()
    if teacher is not None:
        teacher.eval()
    dev = next(model.parameters()).device
    trainable = [p for g in groups for p in g["params"]]
    amp = torch.autocast(dev.type, dtype=getattr(torch, cfg.autocast or "bfloat16"), enabled=cfg.autocast is not None)
    t0 = time.perf_counter()
    kernels = compiled(cfg.compile)
    kernels.__enter__()
    try:
        for step in range(start, cfg.steps):
            ts = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, cfg)
            ids = tokens[batch_rows(step, tokens.shape[0], cfg)].to(dev)
            with amp:
                logits = model(input_ids=ids, use_cache=False).logits
                if cfg.loss == "kd":
                    assert teacher is not None
                    with torch.no_grad():
                        target = teacher(input_ids=ids, use_cache=False).logits
            loss = kd_loss(logits, target) if cfg.loss == "kd" else ce_loss(logits, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            opt.step()
            entry = {"step": step + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "grad_norm": float(gn),
                     "seconds": round(time.perf_counter() - ts, 3)}
            result.log.append(entry)
            _report(step + 1, cfg, result, time.perf_counter() - t0, start, progress)
            if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                    and step + 1 < cfg.steps:
                _save(ckpt, {"step": step + 1, "fingerprint": fp, "trainable": _trainable(model),
                             "optimizer": opt.state_dict(), "log": result.log, "rng": torch.get_rng_state()})
                log.info("checkpoint at step %d: %s", step + 1, ckpt)
            if on_step is not None:
                on_step(step + 1, entry)
    finally:
        kernels.__exit__(None, None, None)
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_disable()  # type: ignore[operator]
        model.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _restore(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, fp: str, result: TrainResult) -> int:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fp:
        raise LowbitError(f"{ckpt} belongs to another run (its configuration, training text or starting weights "
                          "differ); resume with the same options, or delete the checkpoint to start over")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(t)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    result.log.extend(state["log"])
    result.resumed_from = int(state["step"])
    log.info("resuming from step %d (%s)", result.resumed_from, ckpt)
    return result.resumed_from


def _fmt(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _report(done: int, cfg: TrainConfig, result: TrainResult, elapsed: float, start: int, progress: bool) -> None:
    if not progress or (done % cfg.log_every and done != cfg.steps and done != start + 1):
        return
    per = elapsed / max(1, done - start)
    recent = result.log[-cfg.log_every:]
    loss = sum(e["loss"] for e in recent) / len(recent)
    log.info("qat step %d/%d: loss %.4f (mean of last %d), lr %.2e, %.2f s/step, elapsed %s, ETA %s", done,
             cfg.steps, loss, len(recent), result.log[-1]["lr"], per, _fmt(elapsed), _fmt(per * (cfg.steps - done)))
