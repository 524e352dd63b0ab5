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


class LmEvalSide:
    """lm-eval on the same model: one ``HFLM`` (batch size 1) and one TaskManager, then one task at a time."""

    def __init__(self, model: Any, tok: Any, tasks: list[Any], tmp: Path) -> None:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from lowbit.eval.lm_eval_bridge import hflm, write_lm_eval_tasks

        self.lm_eval = lm_eval
        self.names = dict(zip((t.name for t in tasks), write_lm_eval_tasks(tasks, tmp), strict=True))
        self.lm = hflm(model, tok, batch_size=1)
        self.manager = TaskManager(include_path=str(tmp))  # indexing lm-eval's task folder is not timed
        inner = self.lm.loglikelihood
        self.spent = {"wall": 0.0, "cpu": 0.0}

        def timed(requests: Any, disable_tqdm: bool = False) -> Any:
            with Clock() as c:
                res = inner(requests, disable_tqdm=True)
            self.spent["wall"] += c.wall
            self.spent["cpu"] += c.cpu
            return res

        self.lm.loglikelihood = timed

    def run(self, task: Any) -> dict[str, Any]:
        """lm-eval's metrics, per-document log-likelihoods, the wall/CPU time of ``simple_evaluate`` and of its
        scoring phase alone (``HFLM.loglikelihood``: tokenization and forwards)."""
        name = self.names[task.name]
        self.spent.update(wall=0.0, cpu=0.0)
        with Clock() as c:
            res = self.lm_eval.simple_evaluate(model=self.lm, tasks=[name], task_manager=self.manager,
                                               log_samples=True)
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        results = res["results"][name]
        return {
            "metrics": {k.split(",")[0]: v for k, v in results.items() if "," in k and "_stderr" not in k},
            "stderr": {k.split(",")[0].replace("_stderr", ""): v for k, v in results.items() if "_stderr," in k},
            "seconds": c.wall, "cpu_seconds": c.cpu, "scoring_seconds": self.spent["wall"],
            "scoring_cpu_seconds": self.spent["cpu"],
            "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
            "greedy": [[bool(r[1]) for r in s["filtered_resps"]] for s in samples],
            "version": self.lm_eval.__version__,
        }


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
    report: dict[str, Any] = {
        "model": a.model, "backend": backend, "limit": a.limit, "threads": a.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "load_avg_start": os.getloadavg()},
        "tasks": {},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory()
    side = None if a.no_lm_eval else LmEvalSide(model, tok, tasks, Path(tmp.name))
    rows = []
    for task in tasks:  # interleaved, so that changing contention from other jobs hits both sides alike
        with Clock() as c:  # one call per task: its time includes tokenization, as lm-eval's scoring phase does
            r = evaluate_tasks({"m": model}, tok, [task], progress=False,
                               max_tokens=a.max_tokens or MAX_TOKENS)["m"][task.name]
        print(f"lowbit {task.name}: {c.wall:.1f} s", flush=True)
        summary = {k: v for k, v in r.to_dict().items() if k not in ("loglikelihoods", "gold")}
        entry: dict[str, Any] = {"source": task.source, "lowbit_wall_seconds": c.wall, "lowbit_cpu_seconds": c.cpu,
                                 "lowbit": summary}
        if side is not None:
            th = side.run(task)
            report["lm_eval_version"] = th["version"]
            entry["lm_eval"] = {k: v for k, v in th.items() if k not in ("loglikelihoods", "greedy", "version")}
            entry["parity"] = compare(task, r, th)
            entry["speedup"] = {"wall": th["seconds"] / c.wall, "wall_scoring": th["scoring_seconds"] / c.wall,
                                "cpu_scoring": th["scoring_cpu_seconds"] / c.cpu}
            p, x = entry["parity"], entry["speedup"]
            rows.append(f"{task.name:15s} docs {r.n_docs:4d}  same {p['same_prediction'] * 100:6.2f}%  "
                        f"same_norm {p['same_prediction_norm'] * 100:6.2f}%  max|dll| {p['max_abs_dll']:.2e}  "
                        f"Δ(points) {json.dumps({k: round(v, 3) for k, v in p['metric_diff_points'].items()})}  "
                        f"lowbit {c.wall:6.1f} s  lm-eval {th['seconds']:6.1f} s (scoring "
                        f"{th['scoring_seconds']:.1f} s)  x{x['wall']:.2f} / scoring x{x['wall_scoring']:.2f} / "
                        f"scoring cpu x{x['cpu_scoring']:.2f}")
        else:
            rows.append(f"{task.name:15s} docs {r.n_docs:4d}  {r.metrics}  lowbit {c.wall:6.1f} s  "
                        f"(cpu {c.cpu:.1f} s)  tokens {r.tokens} of {r.tokens_unshared}")
        print(rows[-1], flush=True)
        report["tasks"][task.name] = entry
        _totals(report)
        out.write_text(json.dumps(report, indent=1, default=_plain) + "\n")  # after every task: partial results
    tmp.cleanup()
    print("\n".join(rows + [report["total_line"]]))


def _plain(o: Any) -> Any:
    return float(o) if isinstance(o, np.floating) else str(o)


def _totals(report: dict[str, Any]) -> None:
    """Sums over the tasks done so far; the speed-ups of the totals."""
    tasks = report["tasks"].values()
    ours = {"wall": sum(t["lowbit_wall_seconds"] for t in tasks), "cpu": sum(t["lowbit_cpu_seconds"] for t in tasks)}
    report["lowbit_seconds"] = ours
    report["load_avg_end"] = os.getloadavg()
    line = f"total: lowbit {ours['wall']:.1f} s (cpu {ours['cpu']:.1f} s)"
    if all("lm_eval" in t for t in tasks):
        theirs = {k: sum(t["lm_eval"][k] for t in tasks) for k in ("seconds", "scoring_seconds", "scoring_cpu_seconds")}
        report["lm_eval_seconds"] = theirs
        report["speedup_total"] = {"wall": theirs["seconds"] / ours["wall"],
                                   "wall_scoring": theirs["scoring_seconds"] / ours["wall"],
                                   "cpu_scoring": theirs["scoring_cpu_seconds"] / ours["cpu"]}
        line += (f", lm-eval {theirs['seconds']:.1f} s (scoring {theirs['scoring_seconds']:.1f} s, cpu "
                 f"{theirs['scoring_cpu_seconds']:.1f} s); speed-up "
                 f"{json.dumps({k: round(v, 2) for k, v in report['speedup_total'].items()})}")
    report["total_line"] = line

if __name__ == "__main__":
    main()
