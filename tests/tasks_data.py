"""Tiny task files in the layouts of ../shared/data (and the hub rows), for the zero-shot task tests."""

from __future__ import annotations

import json
from pathlib import Path

HELLASWAG_TEXT = [
    ("Roof shingle removal: A man is sitting on a roof. he", 3,
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
      "starts pulling up roofing on a roof."]),
    ("Family Life: How to entertain a toddler. Visit a site like [www.kiddio.org] to find games.", 1,
     ["Choose small [title] simple games.", "Ask the  toddler what he would like.", "Go out.", "Sleep [step] now."]),
    ("Canoeing: Two women are shown in a canoe. the child and a different man", 2,
     ["are then shown paddling.", "are driving the canoe.", "sit in a canoe while the man paddles.", "walk."]),
]
ARC = [
    ({"query": "Question: Which piece of safety equipment keeps mold spores out of the lungs?",
      "choices": ["safety goggles", "breathing mask", "rubber gloves", "lead apron"], "gold": 1}),
    ({"query": "Question: What is the source of energy for nearly all ecosystems?",
      "choices": ["Sunlight", "Soil", "Water", "Wind"], "gold": 0}),
    ({"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"],
      "gold": 1}),
]
PIQA = [
    ({"goal": "How do I ready a guinea pig cage?", "sol1": "Provide bedding made of paper strips.",
      "sol2": "Provide bedding made of jeans material."}, 0),
    ({"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin "}, 1),
    ({"goal": "To cool a drink quickly", "sol1": "put it in the freezer", "sol2": "put it in the oven"}, 0),
]
WINOGRANDE = [
    {"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                         "Sarah was a much better surgeon than Maria so Maria"],
     "continuation": "always got the easier cases.", "gold": 1},
    {"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                         "Sarah was a much better surgeon than Maria so Maria"],
     "continuation": "always got the harder cases.", "gold": 0},
    {"context_options": ["The wages at the factory were lower than at the plant since it was safer at the plant",
                         "The wages at the factory were lower than at the plant since it was safer at the factory"],
     "continuation": ".", "gold": 1},
]
LAMBADA = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model for tests has two layers and a small vocabulary",
    "hello world this is a test of the tokenizer",
]


def write_task_files(root: Path) -> dict[str, Path]:
    """One small file per task, in the layouts of ../shared/data; returns ``{task: path}``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    p = root / "hellaswag.txt"
    p.write_text("".join(f"{ctx}\n{gold}\n" + "".join(e + "\n" for e in ends) for ctx, gold, ends in HELLASWAG_TEXT))
    paths["hellaswag"] = p
    for name in ("arc_easy", "arc_challenge"):
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in ARC))
        paths[name] = p
    p = root / "valid.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r, _ in PIQA))
    (root / "valid-labels.lst").write_text("".join(f"{g}\n" for _, g in PIQA))
    paths["piqa"] = p
    p = root / "winogrande.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in WINOGRANDE))
    paths["winogrande"] = p
    p = root / "lambada.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    paths["lambada_openai"] = p
    return paths


def task_specs(paths: dict[str, Path]) -> list[str]:
    """``["NAME=PATH", ...]`` for :func:`lowbit.eval.tasks.evaluate_tasks`."""
    return [f"{name}={path}" for name, path in paths.items()]
