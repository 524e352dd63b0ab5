"""One QAT configuration a call, for exploring settings quickly (the side-by-side bench is ``bench/qat.py``).

    python bench/qat_explore.py --tag gptq --init gptq --ptq-only
    python bench/qat_explore.py --tag gptq_e2eqp --init gptq --freeze --slr 5e-4 --steps 200

Builds the PTQ result (GPTQ on 32 x 512 C4 tokens, or RTN) and, unless ``--ptq-only``, QAT from it
(``lowbit.qat.run``: KD on C4 windows, checked disjoint from WikiText-2), writes the artifact under
``--work``, and scores it from disk against the float model on ``--windows`` WikiText-2 windows of 2048
tokens; one JSON line per call is appended to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lowbit.core.scheme import get_scheme
from lowbit.jobs import evaluate_models, quantize
from lowbit.jobs.artifacts import load
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline.engine import Engine
from lowbit.qat import run as qat_run
from lowbit.qat.blocks import BlockConfig
from lowbit.qat.job import QATConfig
from lowbit.qat.train import TrainConfig
from lowbit.recipe import Calibration, Recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", default="W3A16")
    p.add_argument("--gs", type=int, default=64)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--init", default="gptq", choices=["gptq", "rtn"], help="the PTQ method QAT starts from")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-5, help="latent weights")
    p.add_argument("--slr", type=float, default=1e-4, help="scales")
    p.add_argument("--zlr", type=float, default=1e-3, help="zero points")
    p.add_argument("--freeze", action="store_true", help="codes frozen end to end (E2E-QP)")
    p.add_argument("--be", type=int, default=0, help="Block-AP epochs")
    p.add_argument("--bs", type=int, default=64, help="Block-AP windows")
    p.add_argument("--blr", type=float, default=1e-4)
    p.add_argument("--bslr", type=float, default=1e-4)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--tag", required=True)
    p.add_argument("--ptq-only", action="store_true")
    p.add_argument("--work", default="/tmp/qx/art")
    p.add_argument("--results", default="/tmp/qx/results.jsonl")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    scheme = get_scheme(a.preset, group_size=a.gs, symmetric=not a.asym)
    recipe = Recipe(scheme, GPTQConfig(), Calibration("c4", 32, 512, 0)) if a.init == "gptq" else Recipe(scheme)
    eng = Engine(device="cpu", progress=False)
    out = Path(a.work) / a.tag
    t0 = time.perf_counter()
    if a.ptq_only:
        quantize(a.model, recipe, out, engine=eng, force=True)
    else:
        cfg = QATConfig(TrainConfig(steps=a.steps, lr=a.lr, scale_lr=a.slr, zero_lr=a.zlr, log_every=25),
                        BlockConfig(epochs=a.be, samples=a.bs, lr=a.blr, scale_lr=a.bslr),
                        samples=a.samples, seq_len=a.seq, train_weights=not a.freeze)
        qat_run(a.model, recipe, out, cfg, engine=eng, force=True, progress=False)
    dt = time.perf_counter() - t0
    ref, tok = load(a.model)
    model, _ = load(out)
    _, res = evaluate_models({"ref": ref, "q": model}, tok, reference="ref", data=None, ctx=2048,
                             max_windows=a.windows, progress=False)
    row = {"tag": a.tag, "argv": sys.argv[1:], "seconds": round(dt), "ref_ppl": res["ref"].ppl,
           "ppl": res["q"].ppl, "kld": res["q"].kld_mean}
    print(json.dumps(row))
    with open(a.results, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
