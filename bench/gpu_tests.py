"""Run the tests that need CUDA on a GPU, in strict mode, and record the result.

    PYTHONPATH=src python bench/gpu_tests.py            # on a machine with CUDA
    PYTHONPATH=src python bench/gpu_tests.py --allow-cpu  # check the script itself (the gpu tests skip)

The CI machine has no GPU, so the tests marked ``gpu`` skip there (visibly; strict mode allows only
that skip and a deselected ``slow`` test). This script runs them where they can run: every ``gpu``
test, plus the ``kernel`` tests (the Triton kernels), which take the compiled GPU path when CUDA is
present (on a CPU they run in Triton's interpreter). It sets ``LOWBIT_STRICT_TESTS=1``, so on a GPU no test may
skip. Prints one line per test and writes ``bench/results/gpu_tests/<gpu>.json`` with the device,
versions, commit and each test's outcome and duration. Exit status: 0 only if every test passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Recorder:
    """A pytest plugin that keeps each test's outcome (the call phase, or the failing phase)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:  # type: ignore[no-untyped-def]
        row = self.rows.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0, "detail": ""})
        row["seconds"] += report.duration
        if report.outcome != "passed" and row["outcome"] == "passed":
            row["outcome"] = report.outcome
            row["detail"] = str(report.longrepr)[-2000:]


def _commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to check the script)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_tests")
    args = ap.parse_args()
    import pytest
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: run this on a GPU machine (or pass --allow-cpu to check the script)", file=sys.stderr)
        return 2
    os.environ["LOWBIT_STRICT_TESTS"] = "1"
    rec = _Recorder()
    t0 = time.perf_counter()
    # the ``kernel`` tests: Triton kernels, compiled on a GPU, interpreted on a CPU (so CI covers them too)
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu or kernel", *_marked_files()], plugins=[rec])
    wall = time.perf_counter() - t0
    device = torch.cuda.get_device_name(0) if cuda else "cpu (--allow-cpu)"
    print(f"\n{'test':<100} {'outcome':>8} {'s':>7}")
    for node, row in rec.rows.items():
        print(f"{node:<100} {row['outcome']:>8} {row['seconds']:7.1f}")
    passed = sum(r["outcome"] == "passed" for r in rec.rows.values())
    print(f"{passed} passed, {len(rec.rows) - passed} not passed on {device} in {wall:.0f} s (pytest exit {rc})")
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / (re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower() + ".json")
    dest.write_text(json.dumps({
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "pytest_exit": int(rc), "seconds": round(wall, 1),
        "tests": rec.rows}, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0 if rc == 0 and passed == len(rec.rows) and rec.rows else 1


def _marked_files() -> list[str]:
    """The test files holding a ``gpu`` or ``kernel`` mark (``-m`` then picks the tests inside): collecting
    only these keeps the run short."""
    text = {p: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    return sorted(str(p) for p, t in text.items() if "mark.gpu" in t or "mark.kernel" in t)


if __name__ == "__main__":
    sys.exit(main())
