"""Fuzz lowbit's file readers with mutated real files, for a fixed budget: only lowbit's own errors may
come out, no hang, no unbounded memory.

Targets (each a reader that takes a path):

==============  ===========================================================  ===============================
target          reader                                                        seeds (written by this script)
==============  ===========================================================  ===============================
``gguf``        :func:`lowbit.models.loader.check_gguf` + ``read_chat_info``  tiny GGUF models (gguf-py): KVs
                                                                              of every type, F32/F16/Q8_0/Q4_0
``safetensors`` :func:`lowbit.models.loader.check_safetensors`                files from ``safetensors.torch``
``imatrix``     :func:`lowbit.formats.gguf.imatrix.load_imatrix`              GGUF imatrix + legacy ``.dat``
``recipe``      :meth:`lowbit.recipe.Recipe.from_file`                        lowbit and llm-compressor recipes
``artifact``    :func:`lowbit.jobs.artifacts.load` (config.json mutated)      a tiny W4A16 artifact
==============  ===========================================================  ===============================

A mutation engine (no atheris wheel for this Python): bit flips, interesting integers (0, -1, 2^31-1,
2^32, 2^63-1 ... little-endian, 1/2/4/8 bytes) written over random offsets, byte runs inserted, deleted,
duplicated or truncated, splices of two seeds, and for text targets token insertions (YAML anchors and
aliases, deep nesting, huge numbers). Seeded (``--seed``): the same run finds the same inputs. Each input
is written to a file in /dev/shm and read by the target in this process, under a per-input alarm
(``--timeout``) and an address-space limit (``--mem-gb``). Anything but a :class:`LowbitError` is a
crash: the input is saved under ``--crashes`` with its traceback's last line, and the run goes on.

    python bench/fuzz.py --targets all --execs 1000000 --json bench/results/fuzz/fuzz.json
    python bench/fuzz.py --targets imatrix --seconds 60         # a time budget instead
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

INTERESTING = [0, 1, -1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, -0x80000000, 0xFFFFFFFF,
               0x100000000, 0x7FFFFFFFFFFFFFFF, -0x8000000000000000, 2**20, 2**31 - 4, 64, 255, 4096]
TEXT_TOKENS = [b"&a ", b"*a", b"[", b"]", b"{", b"}", b": ", b"- ", b"\n", b"'", b'"', b"!!python/object:os.system ",
               b"1e999", b"-1", b"9" * 400, b"null", b"re:(", b"scheme: ", b"W4A16", b"method: ", b"gptq",
               b"group_size: ", b"overrides:\n  - targets: ", b"\t", b"\x00", b"\xff"]


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


# -- seeds --------------------------------------------------------------------------------------------------------
def seeds_gguf(tmp: Path) -> list[bytes]:
    import gguf
    import numpy as np

    out = []
    for k, qt in enumerate([gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0,
                            gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F16]):
        p = tmp / f"s{k}.gguf"
        w = gguf.GGUFWriter(str(p), "llama")
        w.add_context_length(128)
        w.add_block_count(1)
        w.add_token_list(["<unk>", "<s>", "</s>", "a", "b", "ab"])
        w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        w.add_array("test.nested", [1, 2, 3])
        w.add_float32("test.f", 1.5)
        w.add_bool("test.b", True)
        w.add_string("general.name", "seed")
        data = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
        if qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor("token_embd.weight", data)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor("token_embd.weight", data.astype(np.float16))
        else:
            w.add_tensor("token_embd.weight", gguf.quants.quantize(data, qt), raw_dtype=qt)
        w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out.append(p.read_bytes())
    return out


def seeds_safetensors(tmp: Path) -> list[bytes]:
    import torch
    from safetensors.torch import save_file

    out = []
    for k, tensors in enumerate([{"a": torch.zeros(3, 4)}, {"w": torch.ones(2, 8, dtype=torch.bfloat16),
                                                            "b": torch.arange(5, dtype=torch.int32)},
                                 {"x": torch.zeros(0), "y": torch.ones(1, dtype=torch.uint8)}]):
        p = tmp / f"s{k}.safetensors"
        save_file(tensors, str(p), metadata={"format": "pt"} if k else None)
        out.append(p.read_bytes())
    return out


def seeds_imatrix(tmp: Path) -> list[bytes]:
    import numpy as np

    from lowbit.formats.gguf.imatrix import Imatrix, save_imatrix

    im = Imatrix(sums={"blk.0.attn_q.weight": np.arange(8, dtype=np.float32).reshape(1, 8),
                       "blk.0.ffn_up.weight": np.ones((2, 4), dtype=np.float32)},
                 counts={"blk.0.attn_q.weight": np.array([3], dtype=np.float32),
                         "blk.0.ffn_up.weight": np.array([2, 5], dtype=np.float32)},
                 datasets=["c4"], chunk_count=2, chunk_size=512)
    save_imatrix(im, tmp / "im.gguf")
    legacy = struct.pack("<i", 2)
    for name, vals in (("blk.0.attn_q.weight", [1.0, 2.0, 3.0, 4.0]), ("output.weight", [0.5] * 6)):
        b = name.encode()
        legacy += struct.pack("<i", len(b)) + b + struct.pack("<ii", 4, len(vals))
        legacy += struct.pack(f"<{len(vals)}f", *vals)
    legacy += struct.pack("<i", 7) + struct.pack("<i", 2) + b"c4"
    return [(tmp / "im.gguf").read_bytes(), legacy]


def seeds_recipe(tmp: Path) -> list[bytes]:
    import dataclasses

    from lowbit.core.presets import lookup_scheme
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.recipe.schema import Override, Recipe

    r1 = Recipe(scheme=lookup_scheme("W4A16"), method=GPTQConfig(),
                overrides=(Override(targets=("re:.*down_proj",), scheme=lookup_scheme("W8A16")),),
                ignore=("lm_head",))
    r2 = Recipe(scheme=dataclasses.replace(lookup_scheme("W4A16_ASYM"), group_size=64))
    llmc = (b"quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      targets: [Linear]\n      ignore: [lm_head]\n"
            b"      scheme: W4A16\n      dampening_frac: 0.01\n")
    return [r1.to_yaml().encode(), r2.to_yaml().encode(), json.dumps(r2.to_dict()).encode(), llmc]


def seeds_artifact(tmp: Path) -> list[bytes]:
    return [(_artifact(tmp) / "config.json").read_bytes()]


_ART: dict[str, Path] = {}


def _artifact(tmp: Path) -> Path:
    if "a" not in _ART:
        import dataclasses

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import lowbit
        from conftest import make_tiny_model_dir
        from lowbit.recipe.schema import Recipe

        base = make_tiny_model_dir(tmp / "base", "llama", seed=0)
        scheme = dataclasses.replace(lowbit.lookup_scheme("W4A16"), group_size=32)
        _ART["a"] = lowbit.quantize(str(base), Recipe(scheme=scheme), tmp / "art").path
    return _ART["a"]


# -- targets ------------------------------------------------------------------------------------------------------
def target(name: str, tmp: Path) -> tuple[Callable[[Path], Any], list[bytes], str, bool]:
    """(reader, seeds, file suffix, is text)."""
    if name == "gguf":
        from lowbit.models.loader import check_gguf
        from lowbit.serve.llamacpp import read_chat_info

        def read_gguf(p: Path) -> None:
            check_gguf(p)
            read_chat_info(p)

        return read_gguf, seeds_gguf(tmp), ".gguf", False
    if name == "safetensors":
        from lowbit.models.loader import check_safetensors

        return check_safetensors, seeds_safetensors(tmp), ".safetensors", False
    if name == "imatrix":
        from lowbit.formats.gguf.imatrix import load_imatrix

        return load_imatrix, seeds_imatrix(tmp), ".dat", False
    if name == "recipe":
        from lowbit.recipe.schema import Recipe

        return Recipe.from_file, seeds_recipe(tmp), ".yaml", True
    if name == "artifact":
        import shutil

        from lowbit.jobs.artifacts import load

        art = _artifact(tmp)
        work = tmp / "fuzz-art"
        shutil.copytree(art, work, dirs_exist_ok=True)

        def read_artifact(p: Path) -> None:
            (work / "config.json").write_bytes(p.read_bytes())
            load(work, "cpu")

        return read_artifact, seeds_artifact(tmp), ".json", True
    raise SystemExit(f"unknown target {name}")


# -- mutation -----------------------------------------------------------------------------------------------------
def mutate(rng: random.Random, data: bytes, seeds: list[bytes], text: bool) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4, 8))):
        op = rng.randrange(9 if text else 7)
        n = len(b)
        if op == 0 and n:  # bit flip
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # interesting integer
            size = rng.choice((1, 2, 4, 8))
            v = rng.choice(INTERESTING) & ((1 << (8 * size)) - 1)
            i = rng.randrange(max(n - size, 0) + 1)
            b[i:i + size] = v.to_bytes(size, "little")
        elif op == 2 and n:  # random byte
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 3 and n:  # delete a run
            i = rng.randrange(n)
            del b[i:i + rng.choice((1, 2, 4, 8, 64, 1024))]
        elif op == 4:  # insert random bytes
            i = rng.randrange(n + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 8, 32))))
        elif op == 5 and n:  # truncate
            del b[rng.randrange(n):]
        elif op == 6:  # splice with another seed, or duplicate a run
            other = rng.choice(seeds)
            if other and n:
                i, j = rng.randrange(n), rng.randrange(len(other))
                b = b[:i] + bytearray(other[j:])
            elif n:
                i = rng.randrange(n)
                b[i:i] = b[i:i + rng.randrange(1, 256)]
        elif op == 7:  # text token
            i = rng.randrange(n + 1)
            b[i:i] = rng.choice(TEXT_TOKENS)
        elif op == 8:  # deep nesting / alias bombs
            kind = rng.randrange(3)
            if kind == 0:
                k = rng.choice((100, 1000, 100000))
                b[:0] = b"x: " + b"[" * k + b"]" * k + b"\n"
            elif kind == 1:
                lines = [b"a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
                    b"a%d: &a%d [" % (i, i) + b", ".join([b"*a%d" % (i - 1)] * 9) + b"]" for i in range(1, 12)]
                b[:0] = b"\n".join(lines) + b"\nscheme: *a11\n"
            else:
                b[:0] = b"scheme: " + b"9" * rng.choice((400, 5000, 100000)) + b"\n"
    return bytes(b)


def run(name: str, execs: int, seconds: float, seed: int, timeout: float, crashes: Path, tmp: Path) -> dict[str, Any]:
    from lowbit.core.errors import LowbitError

    reader, seeds, suffix, text = target(name, tmp)
    rng = random.Random(seed)
    path = Path(tempfile.mkstemp(prefix=f"fuzz-{name}-", suffix=suffix, dir="/dev/shm")[1])
    found: dict[str, dict[str, Any]] = {}
    ok = refused = n = 0
    slowest = 0.0
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    while n < execs and time.perf_counter() - t0 < seconds:
        base = seeds[rng.randrange(len(seeds))]
        data = base if n < len(seeds) else mutate(rng, base, seeds, text)
        path.write_bytes(data)
        n += 1
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            reader(path)
            ok += 1
        except LowbitError:
            refused += 1
        except BaseException as e:  # noqa: BLE001 -- everything else is what we look for
            if isinstance(e, KeyboardInterrupt):
                raise
            kind = "hang" if isinstance(e, Hang) else type(e).__name__
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb)), "?")
            key = f"{kind} at {where}"
            if key not in found:
                h = hashlib.sha256(data).hexdigest()[:16]
                d = crashes / name
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{h}{suffix}").write_bytes(data)
                found[key] = {"first_input": str(d / f"{h}{suffix}"), "message": str(e)[:300], "count": 0}
            found[key]["count"] += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        slowest = max(slowest, time.perf_counter() - t)
    path.unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    return {"target": name, "execs": n, "seconds": round(dt, 1), "execs_per_s": round(n / dt, 1),
            "accepted": ok, "refused_with_lowbit_error": refused, "crashes": sum(v["count"] for v in found.values()),
            "distinct_crashes": found, "slowest_input_s": round(slowest, 3), "seed": seed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="all", help="comma list of gguf, safetensors, imatrix, recipe, artifact")
    ap.add_argument("--execs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("--seconds", type=float, default=float("inf"), help="time budget per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds one input may take (then: a hang)")
    ap.add_argument("--mem-gb", type=float, default=4.0, help="address-space limit of this process")
    ap.add_argument("--crashes", default="bench/results/fuzz/crashes")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    names = ["gguf", "safetensors", "imatrix", "recipe", "artifact"] if a.targets == "all" else a.targets.split(",")
    import logging

    logging.disable(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    for n in names:  # seeds first: building them may need more memory than the limit
        target(n, tmp)
    lim = int(a.mem_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    rows = []
    for n in names:
        r = run(n, a.execs, a.seconds, a.seed, a.timeout, Path(a.crashes), tmp)
        rows.append(r)
        print(f"{n}: {r['execs']} execs in {r['seconds']} s ({r['execs_per_s']}/s), {r['accepted']} accepted, "
              f"{r['refused_with_lowbit_error']} refused, {r['crashes']} crashes "
              f"({len(r['distinct_crashes'])} distinct), slowest {r['slowest_input_s']} s", flush=True)
        for k, v in r["distinct_crashes"].items():
            print(f"  {k} x{v['count']}: {v['message'][:160]} -> {v['first_input']}", flush=True)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
