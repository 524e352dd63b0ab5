"""A picture of a sensitivity file: predicted cost per tensor (file order) for each candidate, log scale, with
the measured single-tensor KLD as dots where measured. Needs matplotlib (``pip install 'lowbit[plot]'``)."""

from __future__ import annotations

from pathlib import Path

from lowbit.mixed.sensitivity import Sensitivity


def plot_costs(sens: Sensitivity, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.name for t in sens.tensors]
    fig, ax = plt.subplots(figsize=(max(8.0, len(names) * 0.06), 4.5))
    for i, c in enumerate(sens.candidates):
        xs = [k for k, n in enumerate(names) if c in sens.cost[n]]
        color = f"C{i % 10}"
        ax.plot(xs, [sens.cost[names[k]][c] for k in xs], lw=0.8, color=color, label=f"{c} predicted")
        ms = [k for k in xs if c in sens.measured.get(names[k], {})]
        if ms:
            ax.scatter(ms, [sens.measured[names[k]][c] for k in ms], s=8, color=color, marker="o")
    ax.set_yscale("log")
    ax.set_xlabel("tensor (file order: embedding, then block by block)")
    ax.set_ylabel("KLD with this tensor alone quantized")
    ax.set_title(f"{sens.model}: predicted cost per tensor (lines), measured (dots)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
