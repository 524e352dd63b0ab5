"""The compare report: ``report.json``, ``report.md`` and a self-contained ``report.html`` with plots.

Plots (matplotlib, embedded as PNG; without matplotlib the HTML says so and keeps the tables):
quality (KLD and perplexity increase) against size with the Pareto front marked, and quality against
decode speed.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any

from lowbit.compare.recommend import GB, pareto
from lowbit.core.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

COLUMNS = ("name", "engine", "size MB", "bits/w", "ppl", "Δppl %", "KLD", "top-1", "prefill tok/s", "decode tok/s",
           "peak MB", "load s", "quant s")


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report["rows"]:
        eng = r.get("engine") or "-"
        if r.get("dequantized"):
            eng += " (dequantized)"
        rows.append([r["name"] + ("" if r.get("measured", "full") == "full" else " (proxy)"), eng,
                     _f(r.get("size_bytes") and r["size_bytes"] / 1e6, ".1f"), _f(r.get("bits_per_weight"), ".2f"),
                     _f(r.get("ppl"), ".3f"), _f(r.get("ppl_increase_pct"), "+.2f"), _f(r.get("kld"), ".4f"),
                     _f(r.get("top1"), ".3f"), _f(r.get("prefill_tokens_per_s"), ".1f"),
                     _f(r.get("decode_tokens_per_s"), ".1f"),
                     _f(r.get("peak_memory_bytes") and r["peak_memory_bytes"] / 1e6, ".0f"),
                     _f(r.get("load_seconds"), ".1f"), _f(r.get("quantize_seconds"), ".0f")])
    return rows


def _tasks_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    names = sorted({t for r in report["rows"] for t in (r.get("tasks") or {})})
    rows = [[r["name"], *(_f((r.get("tasks") or {}).get(t, {}).get("acc"), ".4f") for t in names)]
            for r in report["rows"] if r.get("tasks")]
    return names, rows


def render_markdown(report: dict[str, Any]) -> str:
    ev, rec = report["eval"], report["recommendation"]
    lines = [f"# lowbit compare: {report['model']}", "",
             f"Quality: **{ev['protocol']}** perplexity on **{ev['corpus']}**, {ev['windows']} windows of {ev['ctx']} "
             f"tokens ({ev['tokens']} scored); KLD is the mean KL(reference || config) per token; top-1 the share of "
             f"tokens where both pick the same next token. Speed: batch 1, {report['speed']['n_prompt']}-token "
             f"prompt, {report['speed']['n_gen']} new tokens, median of {report['speed']['reps']} prefills, each "
             f"config in a fresh process on {report['speed']['device']} ({report['speed']['threads']} threads). "
             "Every row was measured on the artifact read back from disk, on the engine named.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    names, trows = _tasks_rows(report)
    if trows:
        lines += ["", "Zero-shot accuracy:", "", "| name | " + " | ".join(names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        lines += ["| " + " | ".join(r) + " |" for r in trows]
    lines += ["", f"**Recommendation** (limits: {rec['limits_text']}"
              f"{', the default' if rec.get('default_limit') else ''}): "
              + (f"**{rec['name']}**: {rec['reasons']}" if rec.get("name") else rec["reasons"])]
    if rec.get("runner_up"):
        lines += [f"Runner-up: **{rec['runner_up']['name']}**: {rec['runner_up']['reasons']}"]
    lines += ["", f"Pareto front (size vs KLD): {', '.join(report['pareto']) or '-'}."]
    lines += [f"- {n}" for n in report.get("notes", [])]
    m = report["machine"]
    lines += ["", f"lowbit {report['lowbit_version']}, {m['platform']}, {m['cpu_threads']} threads, "
              f"torch {m['torch']}; "
              f"strategy {report['strategy']}; total {report['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def _plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, base64 PNG) of each plot; empty without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in report["rows"] if r.get("kld") is not None]
    front = set(report["pareto"])
    out = []
    specs = [("KLD vs size", "size_bytes", "kld", 1 / 1e6, "size on disk (MB)", "KLD (nats/token)"),
             ("perplexity increase vs size", "size_bytes", "ppl_increase_pct", 1 / 1e6, "size on disk (MB)",
              "perplexity increase (%)"),
             ("KLD vs decode speed", "decode_tokens_per_s", "kld", 1.0, "decode tokens/s (batch 1)", "KLD")]
    for title, xk, yk, xs, xl, yl in specs:
        pts = [r for r in rows if r.get(xk) is not None and r.get(yk) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for r in pts:
            on = r["name"] in front
            ax.scatter(r[xk] * xs, r[yk], marker="o" if r.get("family") != "gguf" else "s",
                       color="tab:red" if on else "tab:blue", zorder=3)
            ax.annotate(r["name"], (r[xk] * xs, r[yk]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if xk == "size_bytes":
            fp = sorted((r for r in pts if r["name"] in front), key=lambda r: r[xk])
            ax.plot([r[xk] * xs for r in fp], [r[yk] for r in fp], color="tab:red", lw=1, label="Pareto front")
            ax.legend(fontsize=8)
        if yk == "kld" and all(r[yk] > 0 for r in pts):
            ax.set_yscale("log")
        ax.set(xlabel=xl, ylabel=yl, title=title)
        ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.append((title, base64.b64encode(buf.getvalue()).decode()))
    return out


def render_html(report: dict[str, Any]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in table_rows(report))
    plots = _plots(report)
    figs = "".join(f'<h3>{esc(t)}</h3><img alt="{esc(t)}" src="data:image/png;base64,{b}">' for t, b in plots) or (
        "<p>(plots need matplotlib: pip install 'lowbit[report]')</p>")
    rec = report["recommendation"]
    recline = (f"<b>{esc(rec['name'])}</b>: {esc(rec['reasons'])}" if rec.get("name") else esc(rec["reasons"]))
    if rec.get("runner_up"):
        recline += f"<br>Runner-up: <b>{esc(rec['runner_up']['name'])}</b>: {esc(rec['runner_up']['reasons'])}"
    md = esc(render_markdown(report).split("\n\n", 2)[1])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lowbit compare: {esc(report['model'])}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:right}"
            "td:first-child,td:nth-child(2){text-align:left}</style></head><body>"
            f"<h1>lowbit compare: {esc(report['model'])}</h1><p>{md}</p>"
            f"<h2>Recommendation</h2><p>limits: {esc(rec['limits_text'])}</p><p>{recline}</p>"
            f"<h2>Results</h2><table><tr>{head}</tr>{body}</table><h2>Plots</h2>{figs}</body></html>\n")


def write_report(report: dict[str, Any], out: Path) -> None:
    report["pareto"] = pareto(report["rows"])
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report))
    write_text_atomic(out / "report.html", render_html(report))
    log.info("report: %s/report.{json,md,html}", out)


__all__ = ["GB", "COLUMNS", "render_html", "render_markdown", "table_rows", "write_report"]
