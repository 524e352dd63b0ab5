"""Every message a user can get from a bad input to ``lowbit``: run each bad invocation in-process, check it.

Each case calls :func:`lowbit.cli.main` with a bad command line (paths in a temp sandbox: a tiny random
model built from a config, a few bad files) and records the command (temp paths shown as placeholders
such as MODEL, OUT, FILE), the exit status, the one error line and the seconds it took. A case must exit 2
with exactly one non-empty line on stderr besides log records (an INFO line naming the corpus it found is a
log, not an error; each case records how many there were) and progress bars, no traceback, nothing written
into the sandbox, and no model loaded (nor fetched) -- unless the case is marked ``after_load`` (the check
needs the model); a case that does not is printed as a FINDING. No server starts: the server loop is
patched to stop a case whose checks all pass.

Writes ``docs/errors.md`` (a user-facing table grouped by subcommand) and
``bench/results/first_hour/bad_inputs.json``.

    PYTHONPATH=src python scripts/bad_inputs.py [--only SUBSTRING] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # make_tiny_model_dir
SAME = "as the message says"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR) "
                      r"|^[\w ]+: +\d+%\|.*\| \d+/\d+ \[")  # a log record, or a progress bar (a model loading)


class ModelLoaded(Exception):
    """Raised by the patched loaders: the command reached a model load (or fetch) before failing."""


_ABSENT = object()
_HELD: list[socket.socket] = []  # a listening socket for the port-in-use cases


class WouldServe(Exception):
    """Raised by the patched server loop: every check passed and the server would start."""


@dataclass
class Case:
    group: str  # the subcommand the table groups it under
    argv: str  # the command line after ``lowbit``, placeholders in braces: {MODEL}
    fix: str = SAME  # what the user does (SAME: the message says it)
    expect: int = 2
    after_load: bool = False  # the check needs the model: loading is allowed
    simulate: str | None = None  # a condition this machine lacks, patched in (e.g. "no-write-permission")
    note: str = ""


# the user-facing "what to do" texts that the messages do not say themselves
FIX_SUBCOMMANDS = "run `lowbit --help` for the commands"
FIX_HELP = "run `lowbit COMMAND --help` for the options"
FIX_IMATRIX = "pass an imatrix from `lowbit imatrix` or llama-imatrix"

CASES: list[Case] = [
    # --- argparse (every subcommand): usage errors ---
    Case("lowbit", "", FIX_SUBCOMMANDS),
    Case("lowbit", "frobnicate {MODEL}", FIX_SUBCOMMANDS),
    Case("lowbit", "--quiet quantize {MODEL} --scheme W4A16 -o {OUT}", FIX_HELP),
    Case("quantize", "quantize {MODEL}", "add -o OUT (a new or empty folder)"),
    Case("quantize", "quantize {MODEL} -o {OUT} --method foo", SAME),
    Case("quantize", "quantize {MODEL} -o {OUT} --scheme W4A16 --group-size abc", "give an integer (-1: per channel)"),
    Case("quantize", "quantize {MODEL} -o {OUT} --scheme W4A16 --format gguf", "for GGUF use `lowbit gguf`"),
    Case("quantize", "quantize {MODEL} -o {OUT} --scheme W4A16 --bogus", FIX_HELP),
    Case("qat", "qat {MODEL} -o {OUT} --scheme W4A16 --init random", SAME),
    Case("eval", "eval {MODEL} --protocol lm-eval", SAME),
    Case("models", "models smollm2-135m", "`lowbit models` takes no arguments"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --type Q9_K", SAME),
    Case("imatrix", "imatrix {MODEL}", "add -o FILE.imatrix.gguf"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --family fp8", SAME),
    Case("serve", "serve {MODEL} --port eighty", "give a port number, e.g. 8000"),
    Case("export", "export {TINYGGUF}", "name the target: `lowbit export ollama FILE.gguf`"),
    Case("doctor", "doctor {ART} --engine tgi", SAME),
    Case("compare", "compare {MODEL} -o {OUT} --strategy quick", SAME),
    Case("run", "run --windows many", "give an integer"),
    # --- quantize: the model and -o ---
    Case("quantize", "quantize {MISSING} --scheme W4A16 -o {OUT}"),
    Case("quantize", "quantize {NOCONFIG} --scheme W4A16 -o {OUT}"),
    Case("quantize", "quantize {AFILE} --scheme W4A16 -o {OUT}"),
    Case("quantize", "quantize {FAKEGGUF} --scheme W4A16 -o {OUT}"),
    Case("quantize", "quantize nosuch-org/nosuch-model --scheme W4A16 -o {OUT}", after_load=True,
         note="a hub id is looked up (the hub or the local HF cache) before the message"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 -o {FULL}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 -o {FULL} --force"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 -o {AFILE}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 -o {AFILE}/sub"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 -o {RODIR}/out", simulate="no-write-permission"),
    Case("quantize", "quantize smollm2-135m --scheme W4A16 -o {FULL}",
         note="an offline source is not fetched to learn that -o is unusable"),
    # --- quantize: scheme, method, format ---
    Case("quantize", "quantize {MODEL} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W5A16 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme NF4 --method gptq -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method smoothquant -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme FP8 --method gptq -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --format bitsandbytes -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme NF4 --format awq -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --group-size 48 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme NF4 --group-size 100 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme INT8-LLM --group-size 64 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme INT8-LLM --threshold -1 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --double-quant -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --alpha 0.5 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --damp 0.1 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --awq-clip -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --mse-guard 8 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method awq --awq-load {MISSING}.pt -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method awq --awq-load {AFILE} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --override 're:.*down_proj' -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --override 're:.*down_proj=W5A16' -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --override 're:.*down_proj=NF4' -o {OUT}", after_load=True,
         note="whether the schemes mix depends on which linears the targets match"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --override 're:.*down_proj=W8A16' --format awq -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --override 're:.*nothing_here=W8A16' -o {OUT}",
         after_load=True, note="targets are matched against the model's linears"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --ignore 're:.*' -o {OUT}", after_load=True,
         note="targets are matched against the model's linears"),
    # --- quantize: numbers ---
    Case("quantize", "quantize {MODEL} --scheme W4A16 --calib-samples 0 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --calib-len 0 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --seed -1 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --threads 0 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --block-size 0 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W8A8 --method smoothquant --alpha 1.5 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --asym-alpha 2 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --damp 0 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method awq --awq-tokens 0 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --resume --no-checkpoint -o {OUT}"),
    # --- quantize: device ---
    Case("quantize", "quantize {MODEL} --scheme W4A16 --device cuda -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --device tpu -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --device mps -o {OUT}"),
    # --- quantize: calibration data ---
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib no/such/file.jsonl -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_NOTEXT} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_NOTJSON} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_BLANK} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_EMPTYJSONL} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_LATIN1} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_PARQUET} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_BADPARQUET} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib c4:{MISSING}.jsonl -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib hf: -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --method gptq --calib hf:nosuch-org/nosuch-set -o {OUT}",
         note="the datasets library looks the name up (offline here)"),
    # --- quantize: recipe files ---
    Case("quantize", "quantize {MODEL} --recipe missing.yaml -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {NOCONFIG} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_UNKNOWN} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_VALUE} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_YAML} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_LIST} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_NOSCHEME} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_VERSION} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_SCHEME} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_FORMAT} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_OVERRIDE} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_ALIAS} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_LLMC_FIELD} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_LLMC_TWO} -o {OUT}"),
    Case("quantize", "quantize {MODEL} --recipe {R_LLMC_ACTORDER} -o {OUT}"),
    # --- quantize: budgets ---
    Case("quantize", "quantize {MODEL} --bpw 4.5 --scheme W4A16 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --bpw 4.5 --max-size 1GB -o {OUT}"),
    Case("quantize", "quantize {MODEL} --bpw 0.5 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --max-size lots -o {OUT}"),
    Case("quantize", "quantize {MODEL} --max-size 4.5 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --candidates W3,W4 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --bpw 4.5 --method awq -o {OUT}"),
    Case("quantize", "quantize {MODEL} --bpw 4.5 --candidates W5x,W4 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --bpw 4.5 --candidates Q4_K -o {OUT}"),
    Case("quantize", "quantize {MODEL} --bpw 4.5 --sens-samples 0 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --bpw 4.5 --sensitivity {SENS_BAD} -o {OUT}"),
    # --- quantize: the threshold gate ---
    Case("quantize", "quantize {MODEL} --scheme W4A16 --max-ppl-increase -1 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --min-task-acc arc_easy -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --min-task-acc arc_easy=high -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --min-task-acc arc_easy=1.5 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --min-task-acc mmlu=0.5 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --max-ppl-increase 5 --eval-windows 0 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --max-ppl-increase 5 --eval-ctx 1 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --min-task-acc arc_easy=0.5 --task-limit 0 -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --max-ppl-increase 5 --data {MISSING}.txt -o {OUT}"),
    Case("quantize", "quantize {MODEL} --scheme W4A16 --max-ppl-increase 5 --data c4 -o {OUT}"),
    # --- qat ---
    Case("qat", "qat {MISSING} --scheme W4A16 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 -o {FULL}"),
    Case("qat", "qat {MODEL} -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme NF4 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W8A8 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --format awq -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --steps -1 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --steps 0 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --batch-size 0 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --seq-len 1 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --samples 0 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --block-epochs -1 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --max-overlap 2 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --lr -1 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --checkpoint-every -5 -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --device cuda -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --calib {MISSING}.txt -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --data {MISSING}.txt -o {OUT}"),
    Case("qat", "qat {MODEL} --scheme W4A16 --calib {TEXT} --data {TEXT} --steps 1 -o {OUT}", after_load=True,
         note="the overlap is counted in the model's tokens; refused before the PTQ and the training"),
    Case("qat", "qat {MODEL} --scheme W4A16 --max-ppl-increase -3 -o {OUT}"),
    Case("qat", "qat {MODEL} --recipe {R_UNKNOWN} -o {OUT}"),
    # --- eval ---
    Case("eval", "eval {MISSING} --reference smollm2-135m"),
    Case("eval", "eval {MODEL} --reference {MISSING}"),
    Case("eval", "eval {NOCONFIG}"),
    Case("eval", "eval {FAKEGGUF}"),
    Case("eval", "eval {MODEL} --data nope.txt"),
    Case("eval", "eval {MODEL} --data c4"),
    Case("eval", "eval {MODEL} --data {C_BLANK}"),
    Case("eval", "eval {MODEL} --max-windows 0"),
    Case("eval", "eval {MODEL} --ctx 0"),
    Case("eval", "eval {MODEL} --threads 0"),
    Case("eval", "eval {MODEL} --protocol llamacpp --ctx 511"),
    Case("eval", "eval {MODEL} --limit 10"),
    Case("eval", "eval {MODEL} --lm-eval-include {NOCONFIG}"),
    Case("eval", "eval {MODEL} --json {FULL}"),
    Case("eval", "eval {MODEL} --json {AFILE}/res.json"),
    Case("eval", "eval {MODEL} --backend llamacpp"),
    Case("eval", "eval {MODEL} --tasks mmlu"),
    Case("eval", "eval {MODEL} --tasks arc_easy,,piqa"),
    Case("eval", "eval {MODEL} --tasks arc_easy="),
    Case("eval", "eval {MODEL} --tasks arc_easy,arc_easy"),
    Case("eval", "eval {MODEL} --tasks arc_easy --limit 0"),
    Case("eval", "eval {MODEL} --tasks arc_easy={MISSING}.jsonl"),
    Case("eval", "eval {MODEL} --tasks arc_easy={T_LAYOUT}"),
    Case("eval", "eval {MODEL} --tasks arc_easy={T_GOLD}"),
    Case("eval", "eval {MODEL} --tasks arc_easy={T_EMPTY}"),
    Case("eval", "eval {MODEL} --tasks arc_easy={T_BADJSON}"),
    Case("eval", "eval {MODEL} --tasks arc_easy={C_LATIN1}"),
    Case("eval", "eval {MODEL} --lm-eval no_such_lm_eval_task", after_load=True,
         note="lm-eval's task names are known only to lm-eval"),
    # --- gguf ---
    Case("gguf", "gguf {MISSING} -o {GGUFOUT}"),
    Case("gguf", "gguf {NOCONFIG} -o {GGUFOUT}"),
    Case("gguf", "gguf {MODEL} -o {TINYGGUF}"),
    Case("gguf", "gguf {MODEL} -o {FULL}"),
    Case("gguf", "gguf {MODEL} -o {AFILE} --force"),
    Case("gguf", "gguf {MODEL} -o {AFILE}/x.gguf"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --type Q4_K_M --bpw 4.5"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --bpw 4.5 --max-size 1GB"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --bpw 40"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --max-size 0MB"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --sensitivity {SENS_BAD}"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --bpw 4.5 --candidates Q4_K,W4"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --bpw 4.5 --sens-len 1"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --bpw 4.5 --sensitivity {SENS_BAD}"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --types {MISSING}.json"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --types {TYPES_BADJSON}"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --types {TYPES_LIST}"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --types {TYPES_UNKNOWN}"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --imatrix {MISSING}.gguf"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --imatrix {IMATRIX_BAD}"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --device cuda"),
    Case("gguf", "gguf {MODEL} -o {GGUFOUT} --device tpu"),
    # --- imatrix ---
    Case("imatrix", "imatrix {MISSING} -o {IMOUT}"),
    Case("imatrix", "imatrix {MODEL} -o {TINYGGUF}"),
    Case("imatrix", "imatrix {MODEL} -o {FULL}"),
    Case("imatrix", "imatrix {MODEL} -o {IMOUT} --calib-samples 0"),
    Case("imatrix", "imatrix {MODEL} -o {IMOUT} --calib {MISSING}.txt"),
    Case("imatrix", "imatrix {MODEL} -o {IMOUT} --calib {C_NOTEXT}"),
    Case("imatrix", "imatrix {MODEL} -o {IMOUT} --seed -1"),
    Case("imatrix", "imatrix {MODEL} -o {IMOUT} --device cuda"),
    # --- sensitivity ---
    Case("sensitivity", "sensitivity {MISSING} -o {OUTFILE}"),
    Case("sensitivity", "sensitivity {MODEL} -o {AFILE}"),
    Case("sensitivity", "sensitivity {MODEL} -o {FULL}"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --calib-samples 0"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --measure -1"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --candidates Q9_K,Q4_K"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --family int --candidates Q4_K"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --family int --imatrix {IMATRIX_BAD}"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --imatrix {IMATRIX_BAD}"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --calib {MISSING}.txt"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --measure 2 --data c4"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --measure 2 --measure-tensors '('"),
    Case("sensitivity", "sensitivity {MODEL} -o {OUTFILE} --measure 2 --measure-candidates Q9_K"),
    Case("sensitivity", "sensitivity {ART} -o {OUTFILE}"),
    # --- serve ---
    Case("serve", "serve {MISSING}"),
    Case("serve", "serve {AFILE}"),
    Case("serve", "serve {FAKEGGUF}"),
    Case("serve", "serve {NOCONFIG}"),
    Case("serve", "serve {MODEL} --port 70000"),
    Case("serve", "serve {MODEL} --port 0"),
    Case("serve", "serve {MODEL} --ctx -1"),
    Case("serve", "serve {MODEL} --max-batch 0"),
    Case("serve", "serve {MODEL} --cors-origin https://example.com"),
    Case("serve", "serve {MODEL} --threads 4"),
    Case("serve", "serve {MODEL} --device cuda"),
    Case("serve", "serve {MODEL} --device tpu"),
    Case("serve", "serve {MODEL} --port {BUSYPORT}"),
    Case("serve", "serve {MODEL} --host 203.0.113.7"),
    Case("serve", "serve {TINYGGUF} --device tpu"),
    Case("serve", "serve {TINYGGUF} --threads 0"),
    Case("serve", "serve {TINYGGUF} --gpu-layers -2"),
    Case("serve", "serve {TINYGGUF} --port 70000"),
    Case("serve", "serve {TINYGGUF} --port {BUSYPORT}"),
    Case("serve", "serve {TINYGGUF} --chat-format no-such-format"),
    Case("serve", "serve {TINYGGUF} --gpu-layers 4"),
    # --- export ---
    Case("export", "export ollama {MISSING}.gguf"),
    Case("export", "export ollama {FAKEGGUF}"),
    Case("export", "export ollama {MODEL}"),
    Case("export", "export ollama {TINYGGUF} -o {MODELFILE}"),
    Case("export", "export ollama {TINYGGUF} -o {AFILE}/Modelfile"),
    Case("export", "export ollama {TINYGGUF} -o {OUTFILE} --system 'say \"\"\"'"),
    # --- doctor ---
    Case("doctor", "doctor {MISSING}"),
    Case("doctor", "doctor {AFILE}"),
    Case("doctor", "doctor {NOCONFIG}"),
    Case("doctor", "doctor {ART} --reference {NOCONFIG}"),
    Case("doctor", "doctor {ART} --reference {MISSING}"),
    # --- compare and run ---
    Case("compare", "compare {MISSING} -o {OUT}"),
    Case("compare", "compare {MODEL} -o {AFILE}"),
    Case("compare", "compare {MODEL} -o {FULL}"),
    Case("compare", "compare {MODEL} -o {OUT} --configs W4A16 --menu full"),
    Case("compare", "compare {MODEL} -o {OUT} --menu {MISSING}.txt"),
    Case("compare", "compare {MODEL} -o {OUT} --menu {M_BAD}"),
    Case("compare", "compare {MODEL} -o {OUT} --configs W5A16"),
    Case("compare", "compare {MODEL} -o {OUT} --configs W4A16:magic"),
    Case("compare", "compare {MODEL} -o {OUT} --configs gguf:Q9_K"),
    Case("compare", "compare {MODEL} -o {OUT} --configs gguf:Q4_K_M+qat"),
    Case("compare", "compare {MODEL} -o {OUT} --configs W4A16,W4A16"),
    Case("compare", "compare {MODEL} -o {OUT} --configs {R_UNKNOWN}"),
    Case("compare", "compare {MODEL} -o {OUT} --configs mix@0.5"),
    Case("compare", "compare {MODEL} -o {OUT} --configs gguf:mix@40"),
    Case("compare", "compare {MODEL} -o {OUT} --windows 0"),
    Case("compare", "compare {MODEL} -o {OUT} --ctx 1"),
    Case("compare", "compare {MODEL} -o {OUT} --qat-steps 0"),
    Case("compare", "compare {MODEL} -o {OUT} --task-limit 0 --tasks arc_easy"),
    Case("compare", "compare {MODEL} -o {OUT} --tasks mmlu"),
    Case("compare", "compare {MODEL} -o {OUT} --tasks arc_easy={T_GOLD}"),
    Case("compare", "compare {MODEL} -o {OUT} --max-size -1"),
    Case("compare", "compare {MODEL} -o {OUT} --min-decode-tps 0"),
    Case("compare", "compare {MODEL} -o {OUT} --device cuda"),
    Case("compare", "compare {MODEL} -o {OUT} --threads 0"),
    Case("compare", "compare {MODEL} -o {OUT} --data c4"),
    Case("compare", "compare {MODEL} -o {OUT} --calib {MISSING}.txt"),
    Case("run", "run {MISSING}"),
    Case("run", "run --windows 0"),
    Case("run", "run --device cuda"),
    Case("run", "run --data nope.txt"),
    Case("run", "run -o {FULL}"),
]

# "what to do" where the message names the problem but leaves the remedy implicit (keyed by the case's argv)
FIXES = {
    "quantize {MODEL} --recipe missing.yaml -o {OUT}": "check the path",
    "quantize {MODEL} --scheme INT8-LLM --threshold -1 -o {OUT}": "give --threshold > 0 (default 6.0)",
    "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_BLANK} -o {OUT}": "give a file with text in it",
    "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_EMPTYJSONL} -o {OUT}": "give a file with text in it",
    "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_PARQUET} -o {OUT}": "name the text column `text`",
    "quantize {MODEL} --scheme W4A16 --method gptq --calib {C_BADPARQUET} -o {OUT}":
        "pass a valid parquet file (or .jsonl / .txt)",
    "quantize {MODEL} --recipe {R_UNKNOWN} -o {OUT}": "use one of the keys the message lists",
    "quantize {MODEL} --recipe {R_VALUE} -o {OUT}": "give samples >= 1",
    "quantize {MODEL} --recipe {R_YAML} -o {OUT}": "fix the YAML at that line",
    "quantize {MODEL} --recipe {R_LIST} -o {OUT}": "write the recipe as a mapping (scheme: W4A16, method: ...)",
    "quantize {MODEL} --recipe {R_OVERRIDE} -o {OUT}": "give the override's targets",
    "quantize {MODEL} --recipe {R_LLMC_TWO} -o {OUT}": "keep one quantizing modifier",
    "quantize {MODEL} --scheme W4A16 --override 're:.*down_proj=NF4' -o {OUT}":
        "keep one kind of scheme per artifact (e.g. W8A16 for the override)",
    "quantize {MODEL} --scheme W4A16 --ignore 're:.*' -o {OUT}": "ignore fewer layers",
    "qat {MODEL} --recipe {R_UNKNOWN} -o {OUT}": "use one of the keys the message lists",
    "eval {MODEL} --tasks arc_easy={T_GOLD}": "fix that line's gold index",
    "compare {MODEL} -o {OUT} --tasks arc_easy={T_GOLD}": "fix that line's gold index",
    "gguf {MODEL} -o {GGUFOUT} --types {MISSING}.json": "check the path",
    "gguf {MODEL} -o {GGUFOUT} --types {TYPES_BADJSON}": "fix the JSON (or write a new map with --bpw)",
    "gguf {MODEL} -o {GGUFOUT} --types {TYPES_UNKNOWN}":
        "give every quantizable tensor a type (start from the .types.json a --bpw run writes)",
    "gguf {MODEL} -o {GGUFOUT} --imatrix {MISSING}.gguf": "check the path",
    "gguf {MODEL} -o {GGUFOUT} --imatrix {IMATRIX_BAD}": FIX_IMATRIX,
    "sensitivity {MODEL} -o {OUTFILE} --imatrix {IMATRIX_BAD}": FIX_IMATRIX,
    "gguf {MODEL} -o {GGUFOUT} --max-size 0MB": "give a size > 0",
    "sensitivity {ART} -o {OUTFILE}": "pass the float checkpoint the artifact was made from",
    "doctor {MISSING}": "check the path",
    "eval {MODEL} --lm-eval no_such_lm_eval_task": SAME,
}
for _c in CASES:
    _c.fix = FIXES.get(_c.argv, _c.fix)
assert set(FIXES) <= {c.argv for c in CASES}, set(FIXES) - {c.argv for c in CASES}


# ---------------------------------------------------------------- the sandbox
def _write(p: Path, data: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def build_sandbox(root: Path) -> dict[str, str]:
    """The placeholder -> path map; builds the tiny model, a tiny artifact and GGUF, and the bad files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import make_tiny_model_dir
    from lowbit.cli import main

    fx = root / "fixtures"
    # hidden 128, MLP 256: every default group size (128) divides the inputs, as in a real model
    model = make_tiny_model_dir(fx / "tiny-llama", "llama", hidden_size=128, intermediate_size=256)
    art, gguf = fx / "tiny-w8", fx / "tiny-q8.gguf"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["--no-progress", "quantize", str(model), "--scheme", "W8A16", "-o", str(art)]) == 0
        assert main(["--no-progress", "gguf", str(model), "--type", "Q8_0", "-o", str(gguf)]) == 0
    full = fx / "full"
    _write(full / "mine.txt", "keep me")
    noconfig = fx / "no-config"
    _write(noconfig / "README.txt", "not a model")
    rodir = fx / "read-only"
    rodir.mkdir()
    text = " ".join(f"sentence {i} of the shared text says the quick brown fox jumps over the lazy dog again"
                    for i in range(400))
    arc_ok = {"query": "Question: what is 1+1?\nAnswer:", "choices": ["1", "2"], "gold": 1}
    llmc_base = ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      ignore: [lm_head]\n"
                 "      config_groups:\n        group_0:\n          targets: [Linear]\n"
                 "          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    _HELD.append(busy)
    p = {
        "MODEL": model, "ART": art, "TINYGGUF": gguf, "FULL": full, "NOCONFIG": noconfig, "RODIR": rodir,
        "OUT": root / "out", "OUTFILE": root / "out.json", "GGUFOUT": root / "out.gguf",
        "IMOUT": root / "out.imatrix.gguf", "MISSING": root / "missing",
        "AFILE": _write(fx / "notes.txt", "some notes\n"),
        "TEXT": _write(fx / "text.txt", text),
        "FAKEGGUF": _write(fx / "fake.gguf", b"not a gguf file at all"),
        "MODELFILE": _write(fx / "Modelfile", "FROM x\n"),
        "R_UNKNOWN": _write(fx / "r-unknown.yaml", "scheme: W4A16\ncalibration:\n  sample: 8\n"),
        "R_VALUE": _write(fx / "r-value.yaml", "scheme: W4A16\ncalibration:\n  samples: 0\n"),
        "R_YAML": _write(fx / "r-yaml.yaml", "scheme: [W4A16\n"),
        "R_LIST": _write(fx / "r-list.yaml", "- W4A16\n- gptq\n"),
        "R_NOSCHEME": _write(fx / "r-noscheme.yaml", "method: {gptq: {}}\n"),
        "R_VERSION": _write(fx / "r-version.yaml", "version: 99\nscheme: W4A16\n"),
        "R_SCHEME": _write(fx / "r-scheme.yaml", "scheme: W5A16\n"),
        "R_FORMAT": _write(fx / "r-format.yaml", "scheme: W4A16\nexport:\n  format: gguf\n"),
        "R_OVERRIDE": _write(fx / "r-override.yaml", "scheme: W4A16\noverrides:\n  - targets: []\n    keep: true\n"),
        "R_ALIAS": _write(fx / "r-alias.yaml", "scheme: W4A16\nignore: &t [lm_head]\noverrides:\n"
                          "  - targets: *t\n    keep: true\n"),
        "R_LLMC_FIELD": _write(fx / "r-llmc-field.yaml", llmc_base + ", observer_kwargs: {x: 1}}\n"),
        "R_LLMC_TWO": _write(fx / "r-llmc-two.yaml", "quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n"
                             "      scheme: W4A16\n      targets: [Linear]\n    QuantizationModifier:\n"
                             "      scheme: W8A16\n      targets: [Linear]\n"),
        "R_LLMC_ACTORDER": _write(fx / "r-llmc-actorder.yaml", llmc_base + ", actorder: sideways}\n"),
        "C_NOTEXT": _write(fx / "c-notext.jsonl", '{"text": "ok"}\n{"txt": "no"}\n'),
        "C_NOTJSON": _write(fx / "c-notjson.jsonl", '{"text": "ok"}\nnot json\n'),
        "C_BLANK": _write(fx / "c-blank.txt", "   \n\n  \n"),
        "C_EMPTYJSONL": _write(fx / "c-empty.jsonl", ""),
        "C_LATIN1": _write(fx / "c-latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1")),
        "C_BADPARQUET": _write(fx / "c-bad.parquet", b"PAR1 this is not parquet"),
        "T_LAYOUT": _write(fx / "t-layout.jsonl", '{"question": "q?", "answers": ["a", "b"]}\n'),
        "T_GOLD": _write(fx / "t-gold.jsonl", json.dumps({**arc_ok, "gold": 5}) + "\n"),
        "T_EMPTY": _write(fx / "t-empty.jsonl", ""),
        "T_BADJSON": _write(fx / "t-badjson.jsonl", json.dumps(arc_ok) + "\n{oops\n"),
        "M_BAD": _write(fx / "menu.txt", "W4A16:gptq\nW5A16\n"),
        "TYPES_BADJSON": _write(fx / "types-bad.json", "{not json"),
        "TYPES_LIST": _write(fx / "types-list.json", "[1, 2]"),
        "TYPES_UNKNOWN": _write(fx / "types-unknown.json", json.dumps({"types": {"blk.0.attn_q.weight": "Q9_K"}})),
        "SENS_BAD": _write(fx / "sens.json", json.dumps({"hello": 1})),
        "IMATRIX_BAD": _write(fx / "bad.imatrix.gguf", b"junk, not an imatrix"),
        "BUSYPORT": str(busy.getsockname()[1]),
    }
    cp = fx / "c-nocol.parquet"
    pq.write_table(pa.table({"body": ["a document", "another"]}), cp)
    p["C_PARQUET"] = cp
    return {k: str(v) for k, v in p.items()}


# ---------------------------------------------------------------- running one case
@contextlib.contextmanager
def patched(allow_load: bool, simulate: str | None, paths: dict[str, str]):  # type: ignore[no-untyped-def]
    """Block model loads and fetches (unless ``allow_load``), never start a server, and simulate ``simulate``."""
    import transformers

    import lowbit.models.sources as sources
    import lowbit.serve.llamacpp as serve_llamacpp

    def boom(*a: Any, **k: Any) -> Any:
        raise ModelLoaded("a model was loaded (or fetched) before the input was refused")

    def would_serve(*a: Any, **k: Any) -> Any:
        raise WouldServe("every check passed: the server would start")

    saved: list[tuple[Any, str, Any]] = []

    def put(obj: Any, name: str, value: Any) -> None:
        own = obj.__dict__.get(name, _ABSENT) if isinstance(obj, type) else getattr(obj, name)
        saved.append((obj, name, own))
        setattr(obj, name, value)

    put(serve_llamacpp, "run_uvicorn", would_serve)
    import llama_cpp.server.app as llama_app  # the GGUF server builds its app (and loads the file) here

    put(llama_app, "create_app", would_serve)
    if not allow_load:
        put(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(boom))
        put(transformers.PreTrainedModel, "from_pretrained", classmethod(boom))
        put(sources, "ensure_source", boom)
        for mod in ("lowbit.jobs.gguf", "lowbit.mixed.api"):
            m = sys.modules.get(mod)
            if m is not None and hasattr(m, "ensure_source"):
                put(m, "ensure_source", boom)
    if simulate == "no-write-permission":  # root ignores file modes: pretend RODIR is read-only
        real_access = os.access
        ro = paths["RODIR"]

        def access(path: Any, mode: int, *a: Any, **k: Any) -> bool:
            if str(path).startswith(ro) and mode & os.W_OK:
                return False
            return real_access(path, mode, *a, **k)

        put(os, "access", access)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            try:
                st = p.lstat()
            except OSError:
                continue
            out[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns if p.is_file() else 0)
    return out


def _undo(root: Path, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    import shutil

    new = sorted(set(after) - set(before))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k] and after[k][0] >= 0)
    for k in sorted(new, key=len):
        p = Path(k)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    return new + changed


def expand(argv: str, paths: dict[str, str]) -> list[str]:
    import shlex

    return shlex.split(re.sub(r"\{([A-Z_0-9]+)\}", lambda m: paths[m.group(1)], argv))


def shown(text: str, paths: dict[str, str], root: Path) -> str:
    """``text`` with the sandbox's paths as placeholders (longest first) and the sandbox itself as TMP."""
    for k, v in sorted(paths.items(), key=lambda kv: -len(kv[1])):
        text = text.replace(f":{v}", ":BUSYPORT") if k == "BUSYPORT" else text.replace(v, k)
    return text.replace(str(root), "TMP")


def run_case(case: Case, paths: dict[str, str], root: Path, work: Path) -> dict[str, Any]:
    from lowbit.cli import main

    argv = expand(case.argv, paths)
    err, out = io.StringIO(), io.StringIO()
    before = _snapshot(root)
    rc: Any = None
    problem = None
    t0 = time.perf_counter()
    old_cwd = os.getcwd()
    os.chdir(work)
    try:
        with patched(case.after_load, case.simulate, paths), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            except (ModelLoaded, WouldServe) as e:
                problem = str(e)
            except Exception:  # noqa: BLE001 -- a traceback is what this script looks for
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(old_cwd)
    seconds = time.perf_counter() - t0
    written = _undo(root, before, _snapshot(root))
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    findings = []
    if problem:
        findings.append(problem)
    elif rc != case.expect:
        findings.append(f"exit status {rc}, expected {case.expect}")
    if "Traceback" in err.getvalue():
        findings.append("traceback on stderr")
    said = [ln for ln in lines if not LOG_LINE.match(ln)]  # log lines (INFO: the corpus found ...) are not errors
    if not problem and len(said) != 1:
        findings.append(f"{len(said)} non-empty lines on stderr besides log lines, expected 1")
    if written:
        findings.append("wrote " + ", ".join(shown(w, paths, root) for w in written[:3]))
    message = next((ln for ln in lines if not LOG_LINE.match(ln)), lines[-1] if lines else "")
    command = ("lowbit " + case.argv.replace("{", "").replace("}", "")).strip()
    return {"group": case.group, "command": command,
            "exit": rc, "message": shown(message.strip(), paths, root), "stderr_lines": len(lines),
            "log_lines": len(lines) - len(said),
            "stderr": shown(err.getvalue(), paths, root)[-3000:] if findings else "",
            "seconds": round(seconds, 3), "fix": case.fix, "after_load": case.after_load, "simulated": case.simulate,
            "note": case.note, "findings": findings}


# ---------------------------------------------------------------- the reports
GROUP_ORDER = ["lowbit", "quantize", "qat", "eval", "gguf", "imatrix", "sensitivity", "serve", "export", "doctor",
               "compare", "run", "models"]


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_markdown(results: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    n_msgs = len({r["message"] for r in results})
    lines = [
        "# Error messages",
        "",
        "Every message `lowbit` gives for a bad input, with the command that produces it. A bad input is one",
        "line on stderr and exit status 2 (3: an artifact that misses its threshold gate), before any model",
        "loads and with nothing written -- except where *what to do* says the check needs the model.",
        "Paths are placeholders: MODEL is a model folder, OUT an output path, FULL a non-empty folder, AFILE",
        "an ordinary file, MISSING a path that does not exist, TMP a scratch folder; other capitals name a",
        "bad file of the kind the row shows.",
        "",
        f"Generated by `scripts/bad_inputs.py` ({len(results)} commands, {n_msgs} distinct messages; "
        f"lowbit {meta['lowbit']}). Regenerate it after changing a message.",
        "",
    ]
    groups = [g for g in GROUP_ORDER if any(r["group"] == g for r in results)]
    for g in groups:
        title = "usage errors (any command)" if g == "lowbit" else f"lowbit {g}"
        lines += [f"## {title}", "", "| command | message | what to do |", "|---|---|---|"]
        for r in (r for r in results if r["group"] == g):
            msg = r["message"]
            if r["findings"]:
                msg += " **(FINDING: " + "; ".join(r["findings"]) + ")**"
            when = []
            if r["after_load"]:
                when.append("checked after the model loads")
            if r["simulated"]:
                when.append(f"simulated: {r['simulated']}")
            fix = r["fix"] + (f" ({'; '.join(when)})" if when else "")
            lines.append(f"| `{_cell(r['command'])}` | {_cell(msg)} | {_cell(fix)} |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="run only the cases whose command contains this")
    ap.add_argument("--no-write", action="store_true", help="print only; write neither report")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import torch

    import lowbit

    torch.set_num_threads(1)
    cases = [c for c in CASES if args.only is None or args.only in c.argv or args.only == c.group]
    with tempfile.TemporaryDirectory(prefix="lowbit-bad-inputs-") as tmp:
        root = Path(tmp).resolve()
        t0 = time.perf_counter()
        paths = build_sandbox(root)
        setup = time.perf_counter() - t0
        work = root / "cwd"
        work.mkdir()
        results = []
        for c in cases:
            r = run_case(c, paths, root, work)
            results.append(r)
            logging.getLogger().handlers.clear()
            tag = "FINDING" if r["findings"] else "ok"
            print(f"{tag:7s} {r['exit']!s:>4} {r['seconds']:6.2f}s  {r['command']}\n        {r['message'][:300]}")
            for f in r["findings"]:
                print(f"        FINDING: {f}")
            if r["findings"] and r["stderr"] and r["stderr_lines"] > 1:
                print("        " + r["stderr"][-1200:].replace("\n", "\n        "))
    bad = [r for r in results if r["findings"]]
    msgs = {r["message"] for r in results}
    print(f"\n{len(results)} cases, {len(msgs)} distinct messages, {len(bad)} findings; setup {setup:.1f} s, "
          f"cases {sum(r['seconds'] for r in results):.1f} s, slowest {max(r['seconds'] for r in results):.2f} s")
    meta = {"lowbit": lowbit.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "setup_seconds": round(setup, 1),
            "note": "timings on a shared 2-core machine; other jobs ran at the same time"}
    if not args.no_write and args.only is None:
        write_markdown(results, ROOT / "docs" / "errors.md", meta)
        out = ROOT / "bench" / "results" / "first_hour" / "bad_inputs.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "cases": len(results), "distinct_messages": len(msgs),
                                   "findings": len(bad), "results": results}, indent=1) + "\n")
        print(f"wrote docs/errors.md and {out.relative_to(ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
