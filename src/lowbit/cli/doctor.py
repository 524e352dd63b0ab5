"""``lowbit doctor ARTIFACT``: will these engines load it? Findings name the layer, the rule and the fix."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.cli.common import console, say, sub, table

EXAMPLES = """\
  lowbit doctor out/qwen-w4                        # every engine: vllm, llamacpp, transformers, ollama
  lowbit doctor out/qwen-w4 --engine vllm          # exit 0 only if vLLM will load it
  lowbit doctor qwen-q4km.gguf --engine llamacpp
  lowbit doctor out/qwen-w4 --reference qwen2.5-coder-0.5b   # + per-layer weight error table"""


def register(subs: Any) -> dict[str, Any]:
    d = sub(subs, "doctor", "check an artifact against the engines that will run it", EXAMPLES)
    d.add_argument("artifact", help="an artifact folder or a .gguf file")
    d.add_argument("--engine", action="append", default=None,
                   choices=["vllm", "llamacpp", "transformers", "ollama", "all"],
                   help="engine(s) to check for (repeatable; default all)")
    d.add_argument("--reference", default=None, help="the source model: adds a per-layer weight error table")
    d.add_argument("--no-scan", action="store_true", help="skip the fp16-overflow activation scan")
    return {"doctor": cmd_doctor}


def cmd_doctor(a: argparse.Namespace) -> int:
    from lowbit.doctor import ENGINES, doctor, layer_errors

    if a.reference:
        from lowbit.models.loader import check_spec

        check_spec(a.reference)  # before the artifact is checked (and loaded)
    names = a.engine or ["all"]
    engines = ENGINES if "all" in names else tuple(dict.fromkeys(names))
    rep = doctor(a.artifact, engines, scan=not a.no_scan)
    rows = [[e, "ok" if rep.verdict(e) else "FAILS", rep.checked.get(e, "rules")] for e in engines]
    console.print(table(f"{rep.path} ({rep.kind})", ["engine", "verdict", "checked by"], rows))
    if rep.findings:
        console.print(table("findings", ["engine", "where", "rule", "fix"],
                            [[f.engine + ("" if f.fatal else " (warning)"), f.where, f.rule, f.fix]
                             for f in rep.findings]))
    if rep.activations:
        top = rep.activations[:5]
        say("largest activations (fp16 max 65504): " + ", ".join(f"{n} {v:.3g}" for n, v in top))
    if a.reference:
        errs = layer_errors(a.artifact, a.reference)
        console.print(table("per-layer weight error ||W - W_hat|| / ||W||", ["name", "error"],
                            [[n, f"{e:.4f}"] for n, e in sorted(errs, key=lambda r: -r[1])]))
    say("verdict: " + ("every named engine will load it" if rep.ok else "at least one named engine will refuse it"))
    return 0 if rep.ok else 1
