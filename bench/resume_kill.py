"""Kill a GPTQ run at random moments (SIGKILL), resume it with ``--resume``, compare with an uninterrupted run.

One reference run (``lowbit quantize MODEL --method gptq ... -o ref``), then for each of ``--kills`` random
moments in (0, reference time): a fresh run into its own folder, SIGKILLed at that moment, then
``--resume`` runs until it finishes. Every
file of the artifact but ``provenance.json`` (timings) is compared with the reference by SHA-256.

    python bench/resume_kill.py --model smollm2-135m --kills 5 --json bench/results/resume/smollm2_gptq.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())
            if f.is_file() and f.name != "provenance.json"}


def cmd(model: str, out: Path, a: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", "--no-progress", "quantize", model, "--scheme", "W4A16",
            "--group-size", "64", "--method", "gptq", "--calib", a.calib, "--calib-samples", str(a.samples),
            "--calib-len", str(a.length), "--device", "cpu", "--threads", str(a.threads), "-o", str(out), *extra]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same in every run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lowbit-resume-"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    t = time.perf_counter()
    subprocess.run(cmd(a.model, work / "ref", a), check=True, env=env, stdout=subprocess.DEVNULL)
    ref_s = time.perf_counter() - t
    ref = digests(work / "ref")
    print(f"reference: {ref_s:.1f} s, {len(ref)} files", flush=True)
    rng = random.Random(a.seed)
    rows: list[dict[str, Any]] = []
    for k in range(a.kills):
        at = rng.uniform(0.15, 0.95) * ref_s  # the model load and calibration take the first part
        out = work / f"run{k}"
        p = subprocess.Popen(cmd(a.model, out, a), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            p.wait(timeout=at)
            killed = False
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed = True
        state = out.parent / f".{out.name}.resume"
        meta = state / "meta.json"
        saved = json.loads(meta.read_text())["next_block"] if meta.is_file() else 0
        t = time.perf_counter()
        r = subprocess.run(cmd(a.model, out, a, "--resume"), env=env, capture_output=True, text=True)
        resume_s = time.perf_counter() - t
        same = r.returncode == 0 and digests(out) == ref
        rows.append({"kill_at_s": round(at, 1), "killed": killed, "blocks_saved": saved, "resume_s": round(resume_s, 1),
                     "resume_rc": r.returncode, "byte_identical": same, "state_left": state.exists(),
                     "stderr_tail": r.stderr[-300:] if r.returncode else ""})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "reference_s": round(ref_s, 1),
                                                "rows": rows}, indent=2) + "\n")
    ok = sum(r["byte_identical"] for r in rows)
    print(f"{ok} of {len(rows)} resumed runs byte-identical to the uninterrupted one")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
