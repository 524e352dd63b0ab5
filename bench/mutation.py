"""Mutation check: does changing one line of the GPTQ column update, a packing shift or a GGUF scale
rounding make a test fail?

    PYTHONPATH=src python bench/mutation.py                # all mutations
    PYTHONPATH=src python bench/mutation.py --only G1 S2   # some

For each mutation the repository's ``src``, ``tests`` and ``pyproject.toml`` are copied to a fresh
temporary folder, the one line is replaced there (the working tree is never touched), and the tests
of that area run on the copy (``PYTHONPATH`` and ``tests/conftest.py`` both point at the copy, so
subprocesses spawned by the tests import the mutant too). First every test set runs unmutated: a
mutation only counts as caught by a set that passes on the original. Prints which tests failed per
mutation and writes ``bench/results/mutation/mutation.json``. Exit status 1 if a mutation survives.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GPTQ_TESTS = ["tests/test_gptq_reference.py", "tests/test_gptq_triton.py",
              "tests/test_gptq.py::test_gptq_beats_rtn_on_layer_output", "tests/test_gptq.py::test_act_order"]
PACK_TESTS = ["tests/test_packing.py", "tests/test_format.py::test_round_trip_is_exact",
              "tests/test_awq_gemm.py"]
GGUF_TESTS = ["tests/test_gguf_quants.py"]


@dataclass(frozen=True)
class Mutation:
    key: str
    area: str
    file: str  # relative to the repository root
    line: str  # the exact original line (stripped of its indentation when matched)
    new: str  # its replacement, same indentation
    what: str
    occurrence: int | None = None  # which match, where the line occurs more than once


M = Mutation
MUTATIONS = [
    # --- the GPTQ column update: static groups (torch loop), dynamic groups, the Triton kernel ---
    M("G1", "gptq", "src/lowbit/methods/gptq_block.py", "q = torch.clamp(torch.round(w / s) + z, 0, qmax)",
      "q = torch.clamp(torch.floor(w / s) + z, 0, qmax)", "static loop: floor instead of round"),
    M("G2", "gptq", "src/lowbit/methods/gptq_block.py", "err = (w - s * (q - z)) / U1[i, i]",
      "err = (w - s * (q - z))", "static loop: error not divided by U_ii"),
    M("G3", "gptq", "src/lowbit/methods/gptq_block.py", "W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)",
      "pass", "static loop: in-block update removed"),
    M("G4", "gptq", "src/lowbit/methods/gptq_block.py", "Err1[:, i] = err", "pass",
      "static loop: error not kept for the lazy block update"),
    M("G5", "gptq", "src/lowbit/methods/gptq.py", "W[:, i2:] -= Err1 @ U[i1:i2, i2:]", "pass",
      "lazy block update removed"),
    M("G6", "gptq", "src/lowbit/methods/gptq.py", "q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)",
      "q = torch.clamp(torch.round(w / scale) + zero, 0, qmax - 1)", "dynamic loop: top code lost"),
    M("G7", "gptq", "src/lowbit/methods/gptq.py", "err = (w - scale * (q - zero)) / U1[i, i]",
      "err = (w - scale * (q - zero)) * U1[i, i]", "dynamic loop: error times U_ii"),
    M("G8", "gptq", "src/lowbit/methods/gptq.py", "W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)",
      "W1[:, i + 2:] -= err.unsqueeze(1) * U1[i, i + 2:].unsqueeze(0)", "dynamic loop: next column skipped"),
    M("G9", "gptq", "src/lowbit/methods/gptq.py", "cur = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs].unsqueeze(1)",
      "cur = W[:, j:j + gs].unsqueeze(1)", "dynamic groups fitted on stale weights (the reference's way)"),
    M("G10", "gptq", "src/lowbit/methods/gptq_triton.py", "w = w - err[:, None] * u[None, :]", "w = w",
      "Triton kernel: in-block update removed"),
    M("G11", "gptq", "src/lowbit/methods/gptq_triton.py", "err = tl.math.div_rn(wi - s * (q - z), d)",
      "err = wi - s * (q - z)", "Triton kernel: error not divided by U_ii"),
    M("G12", "gptq", "src/lowbit/methods/gptq_triton.py",
      "W[:, i2:].addmm_(E[:, :n], U[i1:i2, i2:], alpha=-1.0)", "pass", "Triton path: lazy block update removed"),
    # --- packing shifts ---
    M("P1", "pack", "src/lowbit/core/packing.py",
      "stream = ((x.view(rows, chunks, 32, 1) >> shifts) & 1).view(rows, chunks, bits, 32)",
      "stream = ((x.view(rows, chunks, 32, 1) >> (shifts ^ 1)) & 1).view(rows, chunks, bits, 32)",
      "pack_int32: bits 0/1 of each code swapped"),
    M("P2", "pack", "src/lowbit/core/packing.py",
      "weights = torch.ones(32, dtype=torch.int64, device=x.device) << torch.arange(32, device=x.device)",
      "weights = torch.ones(32, dtype=torch.int64, device=x.device) << torch.arange(31, -1, -1, device=x.device)",
      "pack_int32: stream written from the top bit"),
    M("P3", "pack", "src/lowbit/core/packing.py",
      "stream = ((w.view(rows, chunks, bits, 1) >> t) & 1).view(rows, chunks, 32, bits)",
      "stream = ((w.view(rows, chunks, bits, 1) >> (t ^ 1)) & 1).view(rows, chunks, 32, bits)",
      "unpack_int32: stream bits 0/1 swapped"),
    M("P4", "pack", "src/lowbit/formats/awq_gemm.py", "words = (v << shifts).sum(-1)  # nibbles do not overlap: "
      "the sum is a bitwise or, in [0, 2^32)", "words = (v << shifts.flip(0)).sum(-1)",
      "AWQ GEMM: nibble order reversed in the packer"),
    M("P5", "gguf", "src/lowbit/formats/gguf/legacy_np.py", "np.bitwise_or(w[0::4], w[2::4] << np.uint64(4), "
      "out=out[0::2])", "np.bitwise_or(w[0::4], w[2::4] << np.uint64(3), out=out[0::2])",
      "GGUF Q4_0/Q5_0/Q4_1/Q5_1: high-nibble shift 3"),
    M("P6", "gguf", "src/lowbit/formats/gguf/kquants.py", "qs = (Lv[:, :, 0] | (Lv[:, :, 1] << 4)).reshape(-1, 128)",
      "qs = (Lv[:, :, 0] | (Lv[:, :, 1] << 3)).reshape(-1, 128)", "GGUF Q4_K: high-nibble shift 3"),
    # --- GGUF scale rounding ---
    M("S1", "gguf", "src/lowbit/formats/gguf/legacy_np.py", "return v.astype(np.float16)",
      "return (v.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float16)",
      "legacy types: block scales truncated to fp16 instead of rounded to nearest"),
    M("S2", "gguf", "src/lowbit/formats/gguf/kquants.py", "dsub = (fp16_round(d)[:, None] * sc).reshape(-1)",
      "dsub = (d[:, None] * sc).reshape(-1)", "Q4_K/Q5_K: codes requantized with the unrounded super-scale", 0),
    M("S5", "gguf", "src/lowbit/formats/gguf/kquants.py", "dsub = (fp16_round(d)[:, None] * sc).reshape(-1)",
      "dsub = (d[:, None] * sc).reshape(-1)", "Q6_K: codes requantized with the unrounded super-scale", 1),
    M("S3", "gguf", "src/lowbit/formats/gguf/legacy_np.py",
      "d = np.abs(np.maximum(_rowmax(xb), -_rowmin(xb))) / F32(127)  # abs: +0.0 for an all-zero block",
      "d = np.abs(np.maximum(_rowmax(xb), -_rowmin(xb))) / F32(127.5)", "Q8_0: scale amax / 127.5"),
    M("S4", "gguf", "src/lowbit/formats/gguf/qcommon.py", "return v.astype(np.float16).view(np.uint8).reshape(-1, 2)",
      "return (v.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float16).view(np.uint8)"
      ".reshape(-1, 2)", "k-quants: fp16 scale bytes truncated instead of rounded"),
]
TESTS = {"gptq": GPTQ_TESTS, "pack": PACK_TESTS, "gguf": GGUF_TESTS}


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _apply(tree: Path, m: Mutation) -> None:
    path = tree / m.file
    lines = path.read_text().split("\n")
    hits = [i for i, ln in enumerate(lines) if ln.strip() == m.line]
    if len(hits) != 1 and (m.occurrence is None or len(hits) <= m.occurrence):
        raise SystemExit(f"{m.key}: the line {m.line!r} occurs {len(hits)} times in {m.file}; update the mutation")
    i = hits[m.occurrence or 0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = indent + m.new
    path.write_text("\n".join(lines))


def _pytest(tree: Path, tests: list[str], timeout: int) -> tuple[int, list[str], float]:
    """Run ``tests`` on ``tree``: (exit status, the node ids that failed or errored, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("LOWBIT_STRICT_TESTS", None)
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests],
                           cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired:
        return 124, ["(timeout)"], time.perf_counter() - t0
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)))
    return rc, failed, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="mutation keys (G1 P3 S2 ...)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mutation" / "mutation.json")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.key in args.only]
    baseline: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-mutation-") as tmp:
        tree = Path(tmp) / "orig"
        _copy_tree(tree)
        for area in sorted({m.area for m in chosen}):
            rc, failed, sec = _pytest(tree, TESTS[area], args.timeout)
            baseline[area] = {"exit": rc, "failed": failed, "seconds": round(sec, 1)}
            print(f"baseline {area}: exit {rc}, {len(failed)} failing, {sec:.0f} s", flush=True)
            if rc != 0:
                print(f"  the unmutated {area} tests fail ({failed}): fix them first", file=sys.stderr)
                return 2
    rows = []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"lowbit-mutation-{m.key}-") as tmp:
            tree = Path(tmp)
            _copy_tree(tree)
            _apply(tree, m)
            rc, failed, sec = _pytest(tree, TESTS[m.area], args.timeout)
        rows.append({"key": m.key, "area": m.area, "file": m.file, "line": m.line, "mutant": m.new, "what": m.what,
                     "caught": rc != 0, "failed_tests": failed, "seconds": round(sec, 1)})
        print(f"{m.key:<4} {'caught' if rc else 'SURVIVED':<8} {len(failed):>3} tests  {sec:5.0f} s  {m.what}",
              flush=True)
    print(f"\n{'key':<4} {'mutation':<64} caught by")
    for r in rows:
        names = [t.split("::", 1)[-1] for t in r["failed_tests"]]
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        print(f"{r['key']:<4} {r['what'][:64]:<64} {shown if r['caught'] else 'NOTHING (survived)'}")
    survived = [r["key"] for r in rows if not r["caught"]]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations caught" + (f"; survived: {survived}" if survived
                                                                              else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "baseline": baseline,
                                    "mutations": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
