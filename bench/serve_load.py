"""Concurrent streaming clients against ``lowbit serve`` (artifact folder, batched) and llama-cpp-python's
server (``lowbit serve FILE.gguf``) on the same model, one after the other on this machine.

Each of ``--clients`` clients (the official ``openai`` client, asyncio) sends one streaming chat request
(its own question, ``max_tokens``, temperature 0) at the same moment. Per request: time to the first
content chunk, total latency, whether it ended with a ``finish_reason`` and ``[DONE]``, and its tokens
(the streamed text re-tokenized by the model's tokenizer, the same count for both servers). Aggregate
tokens/s = all completion tokens / wall time from the first send to the last answer.

    python bench/serve_load.py --artifact out/smol-w4 --gguf smol.q4_1.gguf --clients 64 --max-tokens 48 \\
        --json bench/results/serve/load_64.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

QUESTIONS = ["What is the capital of {}?", "Write one sentence about {}.", "Name three facts about {}.",
             "Why is {} interesting?"]
TOPICS = ["France", "the moon", "rivers", "music", "bread", "chess", "winter", "bees", "trains", "copper",
          "Japan", "tea", "volcanoes", "maps", "owls", "glass"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", model, "--port", str(port), "--name", "m", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 600 s")


async def client(base: str, i: int, max_tokens: int) -> dict[str, Any]:
    import openai

    c = openai.AsyncOpenAI(base_url=base, api_key="x", timeout=1800, max_retries=0)
    q = QUESTIONS[i % len(QUESTIONS)].format(TOPICS[i % len(TOPICS)])
    t0 = time.perf_counter()
    first = None
    text, finish, error = "", None, None
    try:
        stream = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                                 max_tokens=max_tokens, temperature=0, stream=True)
        async for ch in stream:
            if not ch.choices:
                continue
            d = ch.choices[0].delta.content
            if d:
                first = first or time.perf_counter()
                text += d
            finish = ch.choices[0].finish_reason or finish
    except Exception as e:  # noqa: BLE001 -- a dropped request is a result here
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    await c.close()
    return {"i": i, "t0": t0, "end": end, "latency_s": end - t0, "ttft_s": (first - t0) if first else None,
            "finish": finish, "error": error, "text": text}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_one(name: str, model: str, extra: list[str], clients: int, max_tokens: int, tok: Any) -> dict[str, Any]:
    port = free_port()
    t = time.perf_counter()
    proc = start(model, port, extra)
    load_s = time.perf_counter() - t
    base = f"http://127.0.0.1:{port}/v1"
    try:
        asyncio.run(client(base, 0, 4))  # warm-up (first forward allocations)

        async def all_clients() -> list[dict[str, Any]]:
            return await asyncio.gather(*[client(base, i, max_tokens) for i in range(clients)])

        res = asyncio.run(all_clients())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = [r for r in res if r["error"] is None and r["finish"] in ("stop", "length")]
    for r in res:
        r["tokens"] = len(tok(r["text"], add_special_tokens=False)["input_ids"])
    wall = max(r["end"] for r in res) - min(r["t0"] for r in res)
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    toks = sum(r["tokens"] for r in res)
    out = {"server": name, "model": model, "load_s": round(load_s, 1), "clients": clients, "answered": len(ok),
           "dropped": clients - len(ok), "errors": [r["error"] for r in res if r["error"]][:5],
           "wall_s": round(wall, 2), "completion_tokens": toks, "tokens_per_s": round(toks / wall, 2),
           "latency_p50_s": round(pct(lat, 50), 2) if lat else None,
           "latency_p99_s": round(pct(lat, 99), 2) if lat else None,
           "ttft_p50_s": round(pct(ttft, 50), 2) if ttft else None,
           "ttft_p99_s": round(pct(ttft, 99), 2) if ttft else None,
           "finish_reasons": {f: sum(r["finish"] == f for r in res) for f in {r["finish"] for r in res}},
           "sample": res[0]["text"][:120]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="a lowbit artifact folder (served batched)")
    ap.add_argument("--gguf", default=None, help="the GGUF of the same model (llama-cpp-python's server)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    ap.add_argument("--ctx", type=int, default=2048, help="context of each server (llama.cpp's KV cache)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.artifact)
    keys = ["server", "answered", "dropped", "wall_s", "completion_tokens", "tokens_per_s", "latency_p50_s",
            "latency_p99_s", "ttft_p50_s", "ttft_p99_s"]
    print(" | ".join(keys), flush=True)
    plan = [("lowbit serve (batched)", a.artifact, ["--ctx", str(a.ctx), "--max-batch", str(a.clients)])]
    if a.gguf:
        plan.append(("llama-cpp-python server", a.gguf, ["--ctx", str(a.ctx), "--threads", str(a.threads)]))
    rows = []
    for name, model, extra in plan:  # each row printed and saved as soon as it is measured
        rows.append(run_one(name, model, extra, a.clients, a.max_tokens, tok))
        print(" | ".join(str(rows[-1][k]) for k in keys), flush=True)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_after": os.getloadavg(), "max_tokens": a.max_tokens, "argv": sys.argv[1:]}
            Path(a.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    if len(rows) == 2:
        print(f"aggregate tokens/s ratio lowbit / llama.cpp: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
