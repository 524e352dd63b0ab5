"""lm-evaluation-harness on lowbit models, and lowbit's task documents as lm-eval tasks.

:func:`hflm` hands a loaded model of any artifact kind to lm-eval's ``HFLM`` as a model instance
(Hugging Face causal LMs as they are; a GGUF run by llama.cpp through :class:`LlamaCppModule`, a
thin ``nn.Module`` whose forward returns llama.cpp's logits), so every lm-eval task runs on a
lowbit artifact: :func:`run_lm_eval` is ``lm_eval.simple_evaluate`` on it.

:func:`write_lm_eval_tasks` writes loaded :class:`~lowbit.eval.tasks.TaskData` (rows in the hub
layout lm-eval reads) as JSON lines plus one task YAML each that ``include``-s lm-eval's own task
file and only swaps the dataset for the local file, so lm-eval's prompts, preprocessing and metrics
run unchanged on exactly the documents lowbit scores (``TaskManager(include_path=DIR)``). This works
offline, where lm-eval's own tasks would download their datasets from the hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.io import write_text_atomic
from lowbit.eval.llamacpp import LlamaCppLogits
from lowbit.eval.tasks.base import TaskData

log = logging.getLogger(__name__)

INSTALL = "pip install 'lowbit[eval]'"
TASK_PREFIX = "lowbit_"


def lm_eval_available() -> bool:
    """True when ``lm_eval`` (lm-evaluation-harness) can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def _lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as exc:
        raise LowbitError(f"--lm-eval needs lm-evaluation-harness ({exc}); install it: {INSTALL}") from exc
    return lm_eval


def lm_eval_tasks_dir() -> Path:
    """lm-eval's ``tasks`` folder (its task YAMLs)."""
    return Path(_lm_eval().tasks.__file__).parent


class LlamaCppModule(torch.nn.Module):
    """A GGUF run by llama.cpp as the causal LM ``HFLM`` expects: ``forward(ids (B, T)).logits (B, T, V)``."""

    def __init__(self, model: LlamaCppLogits) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.llama = model
        self.config = PretrainedConfig()
        self.config.max_position_embeddings = model.ctx
        self.config.vocab_size = model.n_vocab
        self.name_or_path = str(model.path)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def tie_weights(self) -> None:
        """Nothing to tie (``HFLM`` calls it on every model instance)."""

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        rows = [self.llama(input_ids[b : b + 1].cpu()) for b in range(input_ids.shape[0])]
        return SimpleNamespace(logits=torch.cat(rows, dim=0))


def hflm(model: Any, tokenizer: Any, batch_size: int = 1) -> Any:
    """lm-eval's ``HFLM`` around an already loaded model (an HF causal LM or a :class:`LlamaCppLogits`)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, LlamaCppLogits):
        model = LlamaCppModule(model)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise LowbitError(f"lm-eval's HFLM needs a causal LM with a config, got {type(model).__name__}")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None,
                include_path: str | Path | None = None, batch_size: int = 1, log_samples: bool = False,
                bootstrap_iters: int = 100_000) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``tasks`` on the loaded model; lm-eval's results dict."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    lm = hflm(model, tokenizer, batch_size)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                       log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    except (KeyError, ValueError, FileNotFoundError, ConnectionError) as exc:
        raise LowbitError(
            f"lm-eval could not run {', '.join(tasks)} ({type(exc).__name__}: {str(exc)[:300]}). Fix: check the "
            "task names (lm-eval --tasks list); offline, lm-eval's own tasks cannot download their datasets: "
            "use lowbit's --tasks, or give local task YAMLs with --lm-eval-include DIR") from exc


def format_table(results: dict[str, Any]) -> str:
    """lm-eval's own results table."""
    from lm_eval.utils import make_table

    return str(make_table(results))


def _yaml(task: TaskData, data: Path) -> str:
    split = task.spec.hf[2]
    splits: dict[str, str | None] = {k: None for k in ("training_split", "validation_split", "test_split",
                                                         "fewshot_split")}
    splits[f"{split}_split"] = split
    lines = [
        f"include: {lm_eval_tasks_dir() / task.spec.lm_eval_yaml}",
        f"task: {TASK_PREFIX}{task.name}",
        "tag: lowbit_zeroshot",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        f"    {split}: {json.dumps(str(data))}",
        *(f"{k}: {'null' if v is None else v}" for k, v in splits.items()),
    ]
    return "\n".join(lines) + "\n"


def write_lm_eval_tasks(tasks: Sequence[TaskData], out_dir: str | Path) -> list[str]:
    """Write each task's documents and an lm-eval task YAML into ``out_dir``; returns the lm-eval task names
    (``lowbit_<task>``) to run with ``TaskManager(include_path=out_dir)``."""
    out = Path(out_dir)
    names = []
    for task in tasks:
        data = (out / f"{task.name}.jsonl").resolve()
        write_text_atomic(data, "".join(json.dumps(d.row, ensure_ascii=False) + "\n" for d in task.docs))
        write_text_atomic(out / f"{TASK_PREFIX}{task.name}.yaml", _yaml(task, data))
        names.append(f"{TASK_PREFIX}{task.name}")
    return names
