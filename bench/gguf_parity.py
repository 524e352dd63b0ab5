"""GGUF parity on real models: lowbit's files vs llama.cpp's own quantizer, tensor by tensor, byte by byte.

For each model: lowbit converts the Hugging Face folder to an F32 GGUF; llama.cpp quantizes that F32 file
(``llama_cpp.llama_model_quantize``, or the ``llama-quantize`` tool with ``--llama-quantize``, which also
takes an imatrix); lowbit writes the same file type straight from the folder; every tensor's type and bytes
are compared. With ``--imatrix`` both use one importance matrix (llama.cpp's ``llama-imatrix`` output when
``--llama-imatrix`` is given, else lowbit's ``lowbit imatrix``). With ``--ppl N`` both Q4_K_M files are
scored by llama.cpp on N WikiText-2 chunks of 512 tokens (llama-perplexity's protocol).

    python bench/gguf_parity.py --models smollm2-135m gemma3-270m qwen2.5-coder-0.5b --types Q4_K_M Q6_K \\
        --llama-quantize /path/llama-quantize --llama-imatrix /path/llama-imatrix --imatrix --ppl 8
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from lowbit.formats.gguf.ftypes import FILE_TYPES
from lowbit.formats.gguf.imatrix import load_imatrix
from lowbit.formats.gguf.writer import write_gguf
from lowbit.models.sources import ensure_source


def llama_quantize(src: Path, dst: Path, ftype: str, tool: str | None, imatrix: Path | None) -> float:
    t0 = time.perf_counter()
    if tool:
        cmd = [tool, *(["--imatrix", str(imatrix)] if imatrix else []), str(src), str(dst), ftype, "2"]
        subprocess.run(cmd, check=True, capture_output=True)
    else:
        if imatrix:
            raise SystemExit("an imatrix reference needs --llama-quantize (llama_model_quantize takes a C++ map)")
        import llama_cpp

        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread = int(FILE_TYPES[ftype][0]), 2
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0
    return time.perf_counter() - t0


def compare(ours: Path, ref: Path) -> dict:
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(ref).tensors}
    diff = [n for n in b if n not in a or a[n].tensor_type != b[n].tensor_type
            or np.asarray(a[n].data).tobytes() != np.asarray(b[n].data).tobytes()]
    return {"tensors": len(b), "identical": len(b) - len(diff), "differ": diff[:10], "same_order": list(a) == list(b)}


def wikitext_chunks_ppl(path: Path, n_chunks: int, text: str, ctx: int = 512) -> float:
    """llama-perplexity's protocol: chunks of ``ctx`` tokens (BOS first), NLL of the second half of each."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=ctx, logits_all=True, verbose=False, n_threads=2)
    toks = llm.tokenize(text.encode(), add_bos=False)
    bos = llm.token_bos()
    nll, n = 0.0, 0
    for c in range(n_chunks):
        ids = toks[c * ctx:(c + 1) * ctx]
        if bos >= 0 and llm.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false":
            ids = [bos, *ids[1:]]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)
        for i in range(ctx // 2, ctx - 1):
            row = logits[i] - logits[i].max()
            nll += float(np.log(np.exp(row).sum()) - row[toks[c * ctx + i + 1]])
            n += 1
    return float(np.exp(nll / n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--types", nargs="+", default=[t for t in FILE_TYPES if t != "F32"])
    ap.add_argument("--llama-quantize", default=None, help="llama.cpp's llama-quantize tool (needed with --imatrix)")
    ap.add_argument("--llama-imatrix", default=None, help="llama.cpp's llama-imatrix tool (its imatrix is used)")
    ap.add_argument("--imatrix", action="store_true", help="also compare with an importance matrix")
    ap.add_argument("--ppl", type=int, default=0, help="score both Q4_K_M files on this many 512-token chunks")
    ap.add_argument("--json", default="bench/results/gguf_parity.json")
    a = ap.parse_args()
    from lowbit.data import wikitext2_test

    rows, text = [], wikitext2_test(raw=True)
    with tempfile.TemporaryDirectory(prefix="gguf-parity-") as td:
        tmp = Path(td)
        for model in a.models:
            folder = ensure_source(model)
            f32 = write_gguf(folder, tmp / f"{model}-f32.gguf", "F32").path
            ims: list[tuple[str, Path | None]] = [("none", None)]
            if a.imatrix:
                im_path = tmp / f"{model}-imatrix.gguf"
                if a.llama_imatrix:
                    (tmp / "calib.txt").write_text(text[:60000])
                    subprocess.run([a.llama_imatrix, "-m", str(f32), "-f", str(tmp / "calib.txt"), "-c", "512",
                                    "--chunks", "16", "-o", str(im_path), "-t", "2"], check=True, capture_output=True)
                    ims.append(("llama-imatrix", im_path))
                else:
                    from lowbit.gguf_jobs import compute_imatrix

                    compute_imatrix(model, im_path, samples=16, length=512, progress=False)
                    ims.append(("lowbit-imatrix", im_path))
            for im_name, im_path in ims:
                for ft in a.types:
                    ref = tmp / f"{model}-{ft}-ref.gguf"
                    t_ref = llama_quantize(f32, ref, ft, a.llama_quantize, im_path)
                    t0 = time.perf_counter()
                    ours = write_gguf(folder, tmp / f"{model}-{ft}-ours.gguf", ft,
                                      imatrix=load_imatrix(im_path) if im_path else None).path
                    row = {"model": model, "type": ft, "imatrix": im_name, **compare(ours, ref),
                           "lowbit_s": round(time.perf_counter() - t0, 2), "llama_cpp_s": round(t_ref, 2)}
                    if a.ppl and ft == "Q4_K_M":
                        row["ppl_lowbit"] = wikitext_chunks_ppl(ours, a.ppl, text)
                        row["ppl_llama_cpp"] = wikitext_chunks_ppl(ref, a.ppl, text)
                    rows.append(row)
                    print(f"{model:20s} {ft:7s} imatrix={im_name:15s} {row['identical']}/{row['tensors']} identical"
                          + (f"  ppl {row['ppl_lowbit']:.4f} vs {row['ppl_llama_cpp']:.4f}" if "ppl_lowbit" in row
                             else ""), flush=True)
                    ours.unlink()
                    ref.unlink()
                    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                        "rows": rows}, indent=1))  # after every row
            f32.unlink()
    print("\n| model | type | imatrix | identical tensors | lowbit s | llama.cpp s | ppl lowbit | ppl llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['type']} | {r['imatrix']} | {r['identical']}/{r['tensors']} | {r['lowbit_s']} | "
              f"{r['llama_cpp_s']} | {r.get('ppl_lowbit', '-')} | {r.get('ppl_llama_cpp', '-')} |")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
