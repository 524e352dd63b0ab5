"""W4A16 / W8A16 matmul speed on one GPU, every Llama-3-8B linear shape, against bf16 and two int4 peers.

    python bench/kernels_speed.py                    # H100 / H200: check, tune, time; JSON to $OUT
    python bench/kernels_speed.py --dry-run          # CPU: Triton interpreter, tiny shapes, no timing

Shapes (N x K, ``y = x W^T``): q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336, and the
fused qkv 6144x4096 / gate_up 28672x4096 that engines run. ``M`` rows (batch) from ``--ms``.

* ``copy``     the device-to-device copy bandwidth of a 1 GiB buffer (bytes read + written), the ceiling;
* ``bf16``     ``F.linear`` on a bf16 weight (cuBLAS);
* ``w4``/``w8`` lowbit's Triton kernels (``TritonWxA16Linear``): W4A16 group 128 symmetric, W8A16 per
               channel symmetric, launch configuration tuned first (``configs.tune``, do_bench medians);
* ``tinygemm`` torch's ``_weight_int4pack_mm`` (int4, group 128);
* ``gemlite``  gemlite's ``A16Wn`` (int4, group 128), when its package imports.

Timing: every variant runs over enough copies of its weights that a pass over them is >= 256 MiB
(reads come from HBM, not L2); one CUDA graph holds >= 48 launches cycling over the copies; the
median of ``--reps`` replays, divided by the launches, is the time of one matmul (decode-like:
back to back, no host gaps). ``bw%`` at M=1 is bytes moved (weights, scales, x, y) over time,
against the copy bandwidth measured in the same call. Correctness comes first: each kernel's
output is compared with a float64 reference of the same weights, and ``--check`` runs the
scheme grid (sym/asym, group 32/128, per channel, 4/8 bits, M in 1..200, split-K, graph replay).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(_ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowbit.core.kernels import configs  # noqa: E402
from lowbit.core.kernels.triton_linear import TritonWxA16Linear  # noqa: E402
from lowbit.core.scheme import QuantScheme  # noqa: E402

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
          "qkv": (6144, 4096), "gate_up": (28672, 4096)}
ROTATE = 256 * 2**20
W4, W8 = QuantScheme(4, 128), QuantScheme(8, None)


def copy_bandwidth(dev: torch.device, nbytes: int = 2**30) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize(dev)
        ts.append(e0.elapsed_time(e1) / 1e3)
    return 2 * nbytes / statistics.median(ts)


def time_graph(fns: list[Callable[[], Any]], reps: int) -> tuple[float, str]:
    """Seconds a call, from CUDA-graph replays of >= 48 launches cycling over ``fns`` (eager if capture fails)."""
    n = len(fns) * -(-48 // len(fns))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns * 2:
            f()
    torch.cuda.current_stream().wait_stream(s)
    mode = "graph"
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n):
                fns[i % len(fns)]()
        run: Callable[[], Any] = g.replay
    except RuntimeError as e:
        mode = f"eager ({str(e).splitlines()[0][:80]})"
        torch.cuda.synchronize()

        def run() -> None:
            for i in range(n):
                fns[i % len(fns)]()
    run()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3 / n)
    return statistics.median(ts), mode


def random_kernel_linear(n: int, k: int, scheme: QuantScheme, dev: torch.device) -> TritonWxA16Linear:
    """A Triton linear with uniformly random codes (random words of the tile layout) and scales."""
    m = TritonWxA16Linear(k, n, scheme, device=dev)
    m.packed.random_(-2**31, 2**31 - 1)
    m.scales.uniform_(0.001, 0.003)
    if m.zeros.numel():
        m.zeros.random_(0, 2**scheme.bits)
    return m


def reference(mod: TritonWxA16Linear, x: torch.Tensor) -> torch.Tensor:
    w = mod.qweight().dequantize(torch.float64)
    y = x.double() @ w.t()
    return y if mod.bias is None else y + mod.bias.double()


def relerr(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def ours(m: int, n: int, k: int, scheme: QuantScheme, dev: torch.device, reps: int, tune: bool) -> dict:
    mods = [random_kernel_linear(n, k, scheme, dev)]
    per = mods[0].packed.numel() * 4 + mods[0].scales.numel() * 2
    mods += [random_kernel_linear(n, k, scheme, dev) for _ in range(max(2, min(64, -(-ROTATE // per))) - 1)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    out: dict[str, Any] = {"relerr": relerr(mods[0](x), reference(mods[0], x))}
    if tune:
        from triton.testing import do_bench

        cfg, t = mods[0].tune(m, lambda f: float(do_bench(f, warmup=5, rep=25, return_mode="median")) / 1e3)
        out["config"], out["tune_s"] = str(cfg), t
    out["t"], out["mode"] = time_graph([lambda mod=mod: mod(x) for mod in mods], reps)
    out["bytes"] = per + (m * k + m * n) * 2
    del mods
    return out


def bf16(m: int, n: int, k: int, dev: torch.device, reps: int) -> dict:
    per = n * k * 2
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(max(2, min(64, -(-ROTATE // per))))]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    t, mode = time_graph([lambda w=w: F.linear(x, w) for w in ws], reps)
    return {"t": t, "mode": mode, "bytes": per + (m * k + m * n) * 2}


def tinygemm(m: int, n: int, k: int, dev: torch.device, reps: int) -> dict:
    """torch's int4 kernel; W = (q - 8) * s + zero with zero = 0 (symmetric), group 128."""
    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32)
        s = torch.rand(n, k // 128, device=dev) * 0.002 + 0.001
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        sz = torch.stack([s.t(), torch.zeros_like(s.t())], -1).to(torch.bfloat16).contiguous()
        return q, s, packed, sz
    q, s, packed, sz = make()
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ref = x.double() @ ((q.double() - 8) * s.to(torch.bfloat16).double().repeat_interleave(128, 1)).t()
    err = relerr(torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz), ref)
    per = packed.numel() * packed.element_size() + sz.numel() * 2
    sets = [(packed, sz)] + [make()[2:] for _ in range(max(2, min(64, -(-ROTATE // per))) - 1)]
    t, mode = time_graph([lambda p=p, z=z: torch.ops.aten._weight_int4pack_mm(x, p, 128, z) for p, z in sets], reps)
    return {"t": t, "mode": mode, "relerr": err, "bytes": per + (m * k + m * n) * 2}


def gemlite_w4(m: int, n: int, k: int, dev: torch.device, reps: int) -> dict:
    from gemlite.helper import A16Wn

    def make() -> tuple[Any, torch.Tensor, torch.Tensor]:
        q = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8)
        s = (torch.rand(n, k // 128, device=dev) * 0.002 + 0.001).to(torch.bfloat16)
        z = torch.full_like(s, 8.0)
        return A16Wn(device=dev, dtype=torch.bfloat16).from_weights(q, s, z, 4, 128), q, s
    lin, q, s = make()
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ref = x.double() @ ((q.double() - 8) * s.double().repeat_interleave(128, 1)).t()
    err = relerr(lin(x), ref)
    per = n * k // 2 + 2 * n * k // 128 * 2
    lins = [lin] + [make()[0] for _ in range(max(2, min(64, -(-ROTATE // per))) - 1)]
    t, mode = time_graph([lambda li=li: li(x) for li in lins], reps)
    return {"t": t, "mode": mode, "relerr": err, "bytes": per + (m * k + m * n) * 2}


def check(dev: torch.device, tiny: bool) -> list[dict]:
    """Every scheme x M x split against float64, plus graph replay and repeated split-K calls."""
    from lowbit.core.qlinear import QuantLinear
    from lowbit.core.qweight import QuantizedWeight

    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    n, k = (48, 384) if tiny else (1040, 4096)
    tol = 2.0**-7 if dev.type == "cpu" else 2.0**-8
    for bits, gs, sym in [(4, 128, True), (4, 128, False), (4, 32, False), (4, None, True), (8, None, True),
                          (8, 128, False)]:
        sch = QuantScheme(bits, gs, sym)
        G = sch.n_groups(k)
        codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
        zeros = (torch.full((n, G), sch.sym_zero, dtype=torch.uint8) if sym
                 else torch.randint(0, 2**bits, (n, G), generator=g, dtype=torch.uint8))
        scales = (torch.rand(n, G, generator=g) * 0.002 + 0.001).to(torch.bfloat16)
        q = QuantLinear.from_qweight(QuantizedWeight(codes, scales, zeros, sch), torch.randn(n, generator=g))
        mod = TritonWxA16Linear.from_quant_linear(q, dev)
        exact = bool(torch.equal(mod.qweight().codes.cpu(), codes))
        for m in ((1, 3, 16) if tiny else (1, 5, 64, 200)):
            x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
            ref = reference(mod, x)
            for cfg in {mod.config(m, dev), configs.GemvConfig(split=4) if m == 1 else configs.GemmConfig(split=4)}:
                y = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)
                for _ in range(2):  # twice: the split-K workspace must be left zeroed
                    mod.run(x, y, cfg)
                # bf16 output: round to nearest is within 2^-8 relative (the interpreter truncates: 2^-7)
                err = float(((y.double() - ref).abs() - tol * ref.abs()).clamp_min(0).max() / ref.abs().max())
                rows.append({"scheme": sch.label, "m": m, "config": str(cfg), "repack_exact": exact,
                             "relerr": relerr(y, ref), "excess": err, "finite": bool(torch.isfinite(y).all())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1,2,4,8,16,32,64")
    ap.add_argument("--fused-ms", default="1,16", help="M values for the fused qkv / gate_up shapes")
    ap.add_argument("--peer-ms", default="1,16", help="M values timed for tinygemm and gemlite")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/kernels"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        rows = check(torch.device("cpu"), tiny=True)
        bad = [r for r in rows if not (r["repack_exact"] and r["finite"] and r["excess"] < 1e-5)]
        print(f"check: {len(rows)} cases, {len(bad)} bad", *bad[:5], sep="\n")
        return
    dev = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "sms": configs.sm_count(0), "copy_bw": copy_bandwidth(dev)}
    import triton

    info["triton"] = triton.__version__
    print(info, flush=True)
    rows = check(dev, tiny=False)
    bad = [r for r in rows if not (r["repack_exact"] and r["finite"] and r["excess"] < 1e-5)]
    print(f"check: {len(rows)} cases, {len(bad)} bad; worst relerr {max(r['relerr'] for r in rows):.2e}", flush=True)
    for r in bad[:10]:
        print("  BAD", r)
    results: dict[str, Any] = {"info": info, "check": rows, "speed": []}
    peers: dict[str, Callable[..., dict]] = {"tinygemm": tinygemm}
    try:
        import gemlite  # noqa: F401

        peers["gemlite"] = gemlite_w4
    except Exception as e:  # noqa: BLE001 - report, do not fail the run
        info["gemlite"] = f"not available: {type(e).__name__}: {e}"
    peer_ms = {int(v) for v in args.peer_ms.split(",")}
    for name in args.shapes:
        n, k = SHAPES[name]
        ms = args.fused_ms if name in ("qkv", "gate_up") else args.ms
        for m in (int(v) for v in ms.split(",")):
            row: dict[str, Any] = {"shape": name, "n": n, "k": k, "m": m, "bf16": bf16(m, n, k, dev, args.reps)}
            row["w4"] = ours(m, n, k, W4, dev, args.reps, not args.no_tune)
            row["w8"] = ours(m, n, k, W8, dev, args.reps, not args.no_tune)
            for p, fn in peers.items():
                if m in peer_ms:
                    try:
                        row[p] = fn(m, n, k, dev, args.reps)
                    except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
                        row[p] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            results["speed"].append(row)
            print(line(row, info["copy_bw"]), flush=True)
            (out / "kernels_speed.json").write_text(json.dumps(results, indent=1))
            configs.save(str(out / "tuned_configs.json"))
    print("\n" + "\n".join(line(r, info["copy_bw"]) for r in results["speed"]))


def line(r: dict, bw: float) -> str:
    b = r["bf16"]["t"]
    parts = [f"{r['shape']:8s} M={r['m']:<3d} bf16 {b * 1e6:7.1f}us"]
    for v in ("w4", "w8", "tinygemm", "gemlite"):
        d = r.get(v)
        if d is None:
            continue
        if "error" in d:
            parts.append(f"{v} ERR")
            continue
        pct = f" {d['bytes'] / d['t'] / bw * 100:3.0f}%bw" if r["m"] == 1 else ""
        parts.append(f"{v} {d['t'] * 1e6:7.1f}us x{b / d['t']:4.2f}{pct}")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
