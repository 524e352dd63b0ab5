"""``lowbit sensitivity``: each tensor's predicted (and, on request, measured) cost of each candidate."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.cli.common import console, say, sub, table
from lowbit.core.errors import LowbitError

EXAMPLES = """\
  lowbit sensitivity gemma3-270m -o gemma.sens.json                              # GGUF types (default)
  lowbit sensitivity gemma3-270m --imatrix g.imatrix.gguf -o gemma.sens.json     # as the file will be written
  lowbit sensitivity qwen2.5-coder-0.5b --family int --method gptq -o qwen.sens.json
  lowbit sensitivity gemma3-270m --candidates Q4_0,Q5_0,Q8_0 --measure 2 --plot cost.png -o s.json
  lowbit gguf gemma3-270m --bpw 4.9 --sensitivity gemma.sens.json -o gemma-mix.gguf"""


def register(subs: Any) -> dict[str, Any]:
    p = sub(subs, "sensitivity", "measure each tensor's sensitivity to each candidate type/scheme (for --bpw)",
            EXAMPLES)
    p.add_argument("model", help="offline source name, model folder or hub id (a float checkpoint)")
    p.add_argument("-o", "--out", required=True, help="output JSON file")
    p.add_argument("--family", default="gguf", choices=["gguf", "int"],
                   help="gguf: GGUF tensor types (llama.cpp); int: integer schemes (compressed-tensors)")
    p.add_argument("--candidates", default=None, help="comma-separated: GGUF types (Q4_K,Q5_0,...) or schemes "
                   "(W4 = 4-bit g128 sym, W4g32, W3g64a = asym, W8c = per-channel); default: the family's set")
    p.add_argument("--method", default="rtn", choices=["rtn", "imatrix", "gptq"],
                   help="how integer schemes are quantized (--family int)")
    p.add_argument("--imatrix", default=None, help="GGUF importance matrix the file will be written with")
    p.add_argument("--calib", default=None, help="calibration text for the Fisher pass (default c4)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample and sampled labels")
    p.add_argument("--measure", type=int, default=0, metavar="WINDOWS",
                   help="also measure the KLD of the model with each tensor alone quantized, on this many 512-token "
                        "windows (slow: one partial forward per tensor and candidate)")
    p.add_argument("--measure-candidates", default=None, help="comma-separated candidates to measure (default all)")
    p.add_argument("--measure-tensors", default=None, metavar="REGEX", help="measure only tensors matching this")
    p.add_argument("--data", default=None, help="evaluation text of the measurement (default wikitext2)")
    p.add_argument("--plot", default=None, help="also draw the cost per tensor to this image (needs matplotlib)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    return {"sensitivity": cmd_sensitivity}


def cmd_sensitivity(a: argparse.Namespace) -> None:
    from lowbit.core.io import check_output_file
    from lowbit.mixed import SensitivityConfig, sensitivity
    from lowbit.mixed.candidates import parse_candidates
    from lowbit.models.loader import check_spec

    check_spec(a.model)
    check_output_file(a.out, overwrite=a.force)
    for flag, v, lo in (("--calib-samples", a.calib_samples, 1), ("--calib-len", a.calib_len, 2),
                        ("--measure", a.measure, 0)):
        if v < lo:
            raise LowbitError(f"{flag} must be >= {lo}, got {v}")
    cands = tuple(a.candidates.split(",")) if a.candidates else None
    parse_candidates(list(cands) if cands else None, a.family)  # a bad name is reported before the model loads
    if a.imatrix and a.family != "gguf":
        raise LowbitError("--imatrix weights GGUF encoders; with --family int use --method imatrix")
    if a.plot:
        _check_plot()
    _check_files(a)
    cfg = SensitivityConfig(family=a.family, candidates=cands, method=a.method, calib=a.calib,
                            samples=a.calib_samples, length=a.calib_len, seed=a.seed)
    meas = a.measure_candidates.split(",") if a.measure_candidates else None
    sens = sensitivity(a.model, cfg, imatrix=a.imatrix, measure_windows=a.measure, measure_candidates=meas,
                       measure_tensors=a.measure_tensors, data=a.data, progress=not a.no_progress)
    sens.save(a.out)
    _report(sens)
    if a.plot:
        from lowbit.mixed.plot import plot_costs

        plot_costs(sens, a.plot)
        say(f"plot: {a.plot}")
    say(f"wrote {a.out}: {len(sens.tensors)} tensors x {len(sens.candidates)} candidates in "
        f"{sens.meta['seconds']['total']:.0f} s")


def _check_files(a: argparse.Namespace) -> None:
    """The imatrix, the calibration text and the measurement's options, before the model loads."""
    import re

    from lowbit.mixed.candidates import parse_candidates

    if a.seed < 0:
        raise LowbitError(f"--seed must be >= 0, got {a.seed}")
    if a.imatrix:
        from lowbit.formats.gguf.imatrix import load_imatrix

        load_imatrix(a.imatrix)
    if a.calib:
        from lowbit.data import resolve_calib_texts

        resolve_calib_texts(a.calib)
    if a.measure:
        from lowbit.jobs.evaluate import eval_text

        eval_text(a.data)
        if a.measure_candidates:
            parse_candidates(a.measure_candidates.split(","), a.family)
        if a.measure_tensors:
            try:
                re.compile(a.measure_tensors)
            except re.error as e:
                raise LowbitError(f"--measure-tensors {a.measure_tensors!r} is not a regular expression ({e})") \
                    from None


def _check_plot() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise LowbitError("--plot needs matplotlib: pip install 'lowbit[plot]'")


def _report(sens: Any) -> None:
    """The most and least sensitive tensors at the middle candidate, and the rank agreement if measured."""
    mid = sens.candidates[len(sens.candidates) // 2]
    rows = sorted(((c[mid], t) for t, c in sens.cost.items() if mid in c), reverse=True)
    show = rows if len(rows) <= 16 else rows[:8] + [(float("nan"), "...")] + rows[-8:]
    console.print(table(f"predicted KLD at {mid} (highest first)", ["name", "predicted KLD"],
                        [[t, "" if v != v else f"{v:.3g}"] for v, t in show]))
    if sens.measured:
        from lowbit.mixed.sensitivity import rank_agreement

        ra = rank_agreement(sens)
        per = ", ".join(f"{c} {v['spearman']:.3f} ({v['tensors']})" for c, v in ra["per_candidate"].items())
        say(f"Spearman, estimate vs measured single-tensor KLD: {ra.get('all', float('nan')):.3f} over "
            f"{ra['pairs']} pairs; per candidate: {per or 'n/a'}")
    secs = sens.meta.get("seconds", {})
    say("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()))
