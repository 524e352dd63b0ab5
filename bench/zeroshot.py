"""Zero-shot tasks: lowbit's scorer against lm-evaluation-harness 0.4 on the very same documents.

Both sides get the same loaded model instance (``--model``: a model spec or any lowbit artifact,
loaded by ``lowbit.jobs.load_any``) and tokenizer, the same torch threads and the same documents:
lowbit's task files are converted to the hub rows lm-eval reads and handed to lm-eval through task
YAMLs that ``include`` lm-eval's own task files (``lowbit.eval.lm_eval_bridge``), so lm-eval's own
prompt construction, tokenization (``HFLM``, batch size 1) and metrics run. Per task it reports
the per-document agreement of the chosen answer (``acc`` and ``acc_norm``), every metric of both
and their difference, the largest log-likelihood difference, each disagreeing document with both
sides' margins, and the wall time of each (lowbit: ``evaluate_tasks``; lm-eval: ``simple_evaluate``)
and their ratio.

    python bench/zeroshot.py --model smollm2-135m --limit 500 --threads 2 --out bench/results/zeroshot/x.json
    python bench/zeroshot.py --model smollm2-135m --no-lm-eval ...   # lowbit only (the suite timing)

Run it with a Python that has lm-eval (``pip install 'lowbit[eval]'``); offline the hub is not used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_TASKS = "hellaswag,arc_easy,piqa,winogrande"


class Clock:
    """Wall and process-CPU seconds of a block (CPU time is what contention from other jobs does not inflate)."""

    def __enter__(self) -> Clock:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def lm_eval_side(model: Any, tok: Any, tasks: list[Any], tmp: Path) -> dict[str, dict[str, Any]]:
    """Per task: lm-eval's metrics, per-document log-likelihoods, the wall/CPU time of ``simple_evaluate``
    and of its scoring phase alone (``HFLM.loglikelihood``: tokenization and forwards)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lowbit.eval.lm_eval_bridge import hflm, write_lm_eval_tasks

    names = write_lm_eval_tasks(tasks, tmp)
    lm = hflm(model, tok, batch_size=1)
    manager = TaskManager(include_path=str(tmp))  # indexing lm-eval's task folder is not timed
    inner = lm.loglikelihood
    spent = {"wall": 0.0, "cpu": 0.0}

    def timed(requests: Any, disable_tqdm: bool = False) -> Any:
        with Clock() as c:
            res = inner(requests, disable_tqdm=True)
        spent["wall"] += c.wall
        spent["cpu"] += c.cpu
        return res

    lm.loglikelihood = timed
    out = {}
    for task, name in zip(tasks, names, strict=True):
        spent.update(wall=0.0, cpu=0.0)
        with Clock() as c:
            res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True)
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        results = res["results"][name]
        out[task.name] = {
            "metrics": {k.split(",")[0]: v for k, v in results.items() if "," in k and "_stderr" not in k},
            "stderr": {k.split(",")[0].replace("_stderr", ""): v for k, v in results.items() if "_stderr," in k},
            "seconds": c.wall, "cpu_seconds": c.cpu, "scoring_seconds": spent["wall"],
            "scoring_cpu_seconds": spent["cpu"],
            "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
            "greedy": [[bool(r[1]) for r in s["filtered_resps"]] for s in samples],
            "version": lm_eval.__version__,
        }
        print(f"lm-eval {task.name}: {c.wall:.1f} s ({spent['wall']:.1f} s scoring)", flush=True)
    return out


def compare(task: Any, ours: Any, theirs: dict[str, Any]) -> dict[str, Any]:
    """Per-document agreement, metric differences and the disagreeing documents of one task."""
    from lowbit.eval.tasks.metrics import choose

    n = ours.n_docs
    lls_t = theirs["loglikelihoods"]
    same, same_norm, diffs = 0, 0, []
    max_dll = 0.0
    for d, doc in enumerate(task.docs):
        mine = ours.loglikelihoods[d]
        max_dll = max(max_dll, max(abs(a - b) for a, b in zip(mine, lls_t[d], strict=True)))
        if task.spec.output == "loglikelihood":
            p_t, pn_t = int(theirs["greedy"][d][0]), None
        else:
            p_t, pn_t = choose(lls_t[d], doc.choices)
        ok = ours.predictions[d] == p_t
        ok_norm = pn_t is None or ours.predictions_norm is None or ours.predictions_norm[d] == pn_t
        same += ok
        same_norm += ok_norm
        if not (ok and ok_norm):
            srt = sorted(mine, reverse=True)
            diffs.append({"doc": d, "where": doc.where, "lowbit": ours.predictions[d], "lm_eval": p_t,
                          "lowbit_norm": None if ours.predictions_norm is None else ours.predictions_norm[d],
                          "lm_eval_norm": pn_t, "lowbit_lls": mine, "lm_eval_lls": lls_t[d],
                          "top2_margin": srt[0] - srt[1] if len(srt) > 1 else None})
    metric_diff = {m: (ours.metrics[m] - theirs["metrics"][m]) * (1 if m == "perplexity" else 100)
                   for m in ours.metrics if m in theirs["metrics"]}
    return {"docs": n, "same_prediction": same / n, "same_prediction_norm": same_norm / n,
            "max_abs_dll": max_dll, "metric_diff_points": metric_diff, "disagreements": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model spec or lowbit artifact folder")
    ap.add_argument("--tokenizer-from", default=None, help="load the tokenizer from this spec (GGUF via llama.cpp)")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help="NAME[=PATH],... (default %(default)s)")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=None, help="trie nodes per forward (default: lowbit's)")
    ap.add_argument("--no-lm-eval", action="store_true", help="time lowbit only")
    ap.add_argument("--out", required=True, help="JSON results file")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    from lowbit.eval.llamacpp import resolve_backend
    from lowbit.eval.tasks import evaluate_tasks, load_tasks
    from lowbit.eval.tasks.runner import MAX_TOKENS
    from lowbit.jobs import load_any

    backend = resolve_backend(a.model, "auto")
    model, tok = load_any(a.model, backend, ctx=2048, threads=a.threads)
    if a.tokenizer_from:
        tok = load_any(a.tokenizer_from)[1]
    tasks = load_tasks([a.tasks], a.limit)
    ours, wall, cpu = {}, {}, {}
    for task in tasks:  # one call per task: its time includes tokenization, as lm-eval's scoring phase does
        with Clock() as c:
            ours.update(evaluate_tasks({"m": model}, tok, [task], progress=False,
                                       max_tokens=a.max_tokens or MAX_TOKENS)["m"])
        wall[task.name], cpu[task.name] = c.wall, c.cpu
        print(f"lowbit {task.name}: {c.wall:.1f} s", flush=True)
    ours_wall = sum(wall.values())
    report: dict[str, Any] = {
        "model": a.model, "backend": backend, "limit": a.limit, "threads": a.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "load_avg_start": os.getloadavg()},
        "lowbit_wall_seconds": ours_wall, "tasks": {},
    }
    theirs: dict[str, Any] = {}
    if not a.no_lm_eval:
        with tempfile.TemporaryDirectory() as tmp:
            theirs = lm_eval_side(model, tok, tasks, Path(tmp))
        report["lm_eval_version"] = next(iter(theirs.values()))["version"]
    rows = []
    for task in tasks:
        r = ours[task.name]
        summary = {k: v for k, v in r.to_dict().items() if k not in ("loglikelihoods", "gold")}
        entry: dict[str, Any] = {"source": task.source, "lowbit_wall_seconds": wall[task.name],
                                 "lowbit_cpu_seconds": cpu[task.name], "lowbit": summary}
        if theirs:
            th = theirs[task.name]
            entry["lm_eval"] = {k: v for k, v in th.items() if k not in ("loglikelihoods", "greedy", "version")}
            entry["parity"] = compare(task, r, th)
            entry["speedup"] = {"wall": th["seconds"] / wall[task.name],
                                "wall_scoring": th["scoring_seconds"] / wall[task.name],
                                "cpu_scoring": th["scoring_cpu_seconds"] / cpu[task.name]}
            p, x = entry["parity"], entry["speedup"]
            rows.append(f"{task.name:15s} docs {r.n_docs:4d}  same {p['same_prediction'] * 100:6.2f}%  "
                        f"same_norm {p['same_prediction_norm'] * 100:6.2f}%  max|dll| {p['max_abs_dll']:.2e}  "
                        f"Δ(points) {json.dumps({k: round(v, 3) for k, v in p['metric_diff_points'].items()})}  "
                        f"lowbit {wall[task.name]:6.1f} s  lm-eval {th['seconds']:6.1f} s (scoring "
                        f"{th['scoring_seconds']:.1f} s)  x{x['wall']:.2f} / scoring x{x['wall_scoring']:.2f} / "
                        f"scoring cpu x{x['cpu_scoring']:.2f}")
        else:
            rows.append(f"{task.name:15s} docs {r.n_docs:4d}  {r.metrics}  lowbit {wall[task.name]:6.1f} s  "
                        f"tokens {r.tokens} of {r.tokens_unshared}")
        report["tasks"][task.name] = entry
    if theirs:
        total = {k: sum(t[k] for t in theirs.values()) for k in ("seconds", "scoring_seconds", "scoring_cpu_seconds")}
        ours_cpu = sum(cpu.values())
        report["lm_eval_seconds"] = total
        report["lowbit_cpu_seconds"] = ours_cpu
        report["speedup_total"] = {"wall": total["seconds"] / ours_wall,
                                   "wall_scoring": total["scoring_seconds"] / ours_wall,
                                   "cpu_scoring": total["scoring_cpu_seconds"] / ours_cpu}
        rows.append(f"total: lowbit {ours_wall:.1f} s (cpu {ours_cpu:.1f}), lm-eval {total['seconds']:.1f} s "
                    f"(scoring {total['scoring_seconds']:.1f} s, cpu {total['scoring_cpu_seconds']:.1f}); "
                    f"{json.dumps({k: round(v, 2) for k, v in report['speedup_total'].items()})}")
    report["load_avg_end"] = os.getloadavg()
    print("\n".join(rows))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1, default=lambda o: float(o) if isinstance(o, np.floating)
                                      else str(o)) + "\n")


if __name__ == "__main__":
    main()
