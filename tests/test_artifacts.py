"""Artifacts as files: real clients load the layouts lowbit writes (g_idx, shards), the bytes do not
depend on the process (hash seed), and a full disk during any writer leaves the old artifact whole.

Client tolerances: the artifacts below store float32 scales and float32 unquantized tensors, so the
client's decompressed weight ``s (q - z)`` is the float32 product lowbit's loader forms; the two
forwards run the same float32 ops, possibly in another order or kernel. Logits of these models are
O(1) (max ~0.6): a reassociation of a float32 sum moves them by ~1e-7 relative per op over a few
dozen ops, far below the bound 1e-5, while one code off by one step moves a logit by ~1e-3.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.cli import main
from lowbit.core.scheme import QuantScheme
from lowbit.formats import compressed_tensors as ct
from lowbit.formats import hf_folder
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline.gptq import GPTQMethod
from lowbit.pipeline.quantize import quantize_model

SRC = Path(__file__).resolve().parents[1] / "src"
TEXT = "\n\n".join(f"line {i}: the quick brown fox jumps over the lazy dog and low bit models" for i in range(80))
# compressed-tensors >= 0.19 refuses `actorder: group` ("has been removed"); 0.18.0 is its last reader
CT_GROUP_INSTALL = "scripts/install_test_clients.sh (a .venv-ct018 beside src/, or set LOWBIT_CT_GROUP_PYTHON)"


def _ids(n=20):
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


CLIENT = r"""
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
import compressed_tensors
folder, ids, dest = sys.argv[1], sys.argv[2], sys.argv[3]
m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
q = m.get_submodule("model.layers.0.self_attn.q_proj")
assert hasattr(q, "weight_g_idx") or hasattr(q, "quantization_scheme"), type(q)
with torch.inference_mode():
    logits = m(torch.tensor([[int(t) for t in ids.split(",")]])).logits
save_file({"logits": logits.contiguous()}, dest)
print("CT", compressed_tensors.__version__)
"""


def _client_python() -> str:
    """The interpreter whose compressed-tensors still reads ``actorder: group`` (0.18.0 or older)."""
    venv = SRC.parent / ".venv-ct018" / "bin" / "python"  # scripts/install_test_clients.sh puts it there
    python = os.environ.get("LOWBIT_CT_GROUP_PYTHON") or (str(venv) if venv.is_file() else sys.executable)
    r = subprocess.run([python, "-c", "import compressed_tensors as c; print(c.__version__)"], capture_output=True,
                       text=True)
    version = tuple(int(p) for p in r.stdout.strip().split(".")[:2]) if r.returncode == 0 else None
    if version is None or version >= (0, 19):
        pytest.skip(f"{python} has compressed-tensors {r.stdout.strip() or 'missing'}, which cannot read "
                    f"`actorder: group`; set up the client with `{CT_GROUP_INSTALL}`")
    return python


def test_transformers_loads_a_g_idx_artifact_and_matches_our_loader(tmp_path):
    """GPTQ with act-order and dynamic groups writes ``weight_g_idx`` (``actorder: group``); transformers +
    compressed-tensors build the compressed modules with the index and compute our logits.

    Symmetric only: for asymmetric pack-quantized weights transformers 5 cannot build the compressed
    module (tests/test_format.py), and compressed-tensors' ``dequantize=True`` path drops ``weight_g_idx``
    (0.18.0 reports it UNEXPECTED and decompresses in the stored column order): a client limitation.
    """
    python = _client_python()
    d = make_tiny_model_dir(tmp_path / "m", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    scheme = QuantScheme(4, 32, True)
    tokens = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    method = GPTQMethod(scheme, GPTQConfig(act_order=True, static_groups=False, asym_alpha=0.0),
                        scale_dtype=torch.float32)
    qws = quantize_model(model, scheme, method, tokens=tokens, progress=False, scale_dtype=torch.float32)
    # a real permutation: every layer's g_idx differs from the plain column // group_size layout
    assert all(not torch.equal(q.g_idx.long(), torch.arange(q.codes.shape[1]) // 32) for q in qws.values())
    out = ct.save_quantized(model, qws, tmp_path / "out", dtype=torch.float32)
    ids = _ids()
    r = subprocess.run([python, "-c", CLIENT, str(out), ",".join(map(str, ids[0].tolist())),
                        str(tmp_path / "theirs.safetensors")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(SRC)})
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = load_file(str(tmp_path / "theirs.safetensors"))["logits"]
    ours = _logits(ct.load_quantized(out)[0], ids)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()  # see module docstring
    assert torch.allclose(ours, _logits(model, ids), rtol=0, atol=1e-5)  # our loader = the quantized model


def test_sharded_artifact_loads_in_transformers_and_matches_our_loader(tmp_path, monkeypatch):
    d = make_tiny_model_dir(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    scheme = QuantScheme(4, 32, True)
    qws = quantize_model(model, scheme, "rtn", progress=False, scale_dtype=torch.float32)
    monkeypatch.setattr(hf_folder, "SHARD_BYTES", 48 * 1024)  # the tiny model's ~190 KiB -> several shards
    out = ct.save_quantized(model, qws, tmp_path / "out", dtype=torch.float32)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and "model.safetensors" not in shards
    assert sorted(set(index["weight_map"].values())) == shards
    on_disk = {k: f for f in shards for k in load_file(str(out / f))}
    assert on_disk == index["weight_map"]  # every tensor in the shard the index names, none left out
    total = sum(t.numel() * t.element_size() for f in shards for t in load_file(str(out / f)).values())
    assert index["metadata"]["total_size"] == total
    ids = _ids()
    ours = _logits(ct.load_quantized(out)[0], ids)
    theirs = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()  # see module docstring
    assert torch.allclose(ours, _logits(model, ids), rtol=0, atol=1e-5)


def _run_cli(runs, seed, cwd):
    """Several CLI commands in one fresh interpreter with ``PYTHONHASHSEED=seed``."""
    code = "import sys\nfrom lowbit.cli import main\n" + "".join(
        f"assert main({['--no-progress', *args]!r}) == 0\n" for args in runs)
    env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


# provenance keys that record the run, not the artifact: wall-clock time
RUN_KEYS = {"quantize_seconds"}


def test_two_processes_with_different_hash_seeds_write_the_same_bytes(tmp_path):
    """GPTQ's artifact and its GGUF conversion from two fresh interpreters (different PYTHONHASHSEED, so
    any set or dict-of-str iteration order that leaks into a file shows)."""
    make_tiny_model_dir(tmp_path / "tiny", "llama")
    (tmp_path / "c.txt").write_text(TEXT)
    for seed in (1, 2):  # the same relative names in two folders: a GGUF's general.name is its source folder's
        (tmp_path / f"r{seed}").mkdir()
        _run_cli([["quantize", "../tiny", "--scheme", "W4A16", "--group-size", "32", "--method", "gptq", "--calib",
                   "../c.txt", "--calib-samples", "4", "--calib-len", "32", "-o", "out"],
                  ["gguf", "out", "-o", "m.gguf", "--type", "Q4_K_M"]], seed, tmp_path / f"r{seed}")
    a, b = tmp_path / "r1" / "out", tmp_path / "r2" / "out"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "model.safetensors" in names
    for name in names:
        if name == "provenance.json":
            ra, rb = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            assert {k for k in ra if ra[k] != rb.get(k)} <= RUN_KEYS and ra.keys() == rb.keys()
            continue
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (tmp_path / "r1" / "m.gguf").read_bytes() == (tmp_path / "r2" / "m.gguf").read_bytes()


# ---- a full disk during each writer ----------------------------------------------------------------

def _enospc(path: str | os.PathLike) -> None:
    """What a full disk does: part of the file is written, then the write fails."""
    Path(path).write_bytes(b"\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# (writer, quantize arguments); every HF-folder format goes through hf_folder's safetensors writer
WRITERS = {
    "compressed-tensors": ["--scheme", "W4A16", "--group-size", "32"],
    "bitsandbytes": ["--scheme", "NF4"],
    "fp8": ["--scheme", "FP8"],
    "w8a8": ["--scheme", "W8A8"],
    "awq-gemm": ["--scheme", "W4A16_ASYM", "--group-size", "32", "--format", "awq"],
}


@pytest.mark.parametrize("fail_at", ["first", "last"])
@pytest.mark.parametrize("writer", [*WRITERS, "gguf"])
def test_disk_full_during_a_writer_keeps_the_old_artifact(tmp_path, monkeypatch, writer, fail_at):
    """Replacing an artifact (--force) when the disk fills at the first or the last safetensors file (GGUF:
    the first or last tensor): the old artifact stays byte for byte, and no temporary file or folder
    is left beside it."""
    import gguf

    src = make_tiny_model_dir(tmp_path / "tiny", "llama")
    work = tmp_path / "work"
    work.mkdir()
    if writer == "gguf":
        from lowbit.formats.gguf.writer import write_gguf

        out = work / "m.gguf"
        write_gguf(src, out, "Q8_0")
    else:
        out = work / "art"
        assert main(["--no-progress", "quantize", str(src), *WRITERS[writer], "-o", str(out)]) == 0
    before = _snapshot(out)
    assert before
    calls = []
    if writer == "gguf":
        real_tensor, real_close = gguf.GGUFWriter.write_tensor_data, gguf.GGUFWriter.close
        n_tensors = len(gguf.GGUFReader(out).tensors)

        def tensor(self, *a, **k):  # type: ignore[no-untyped-def]
            calls.append(1)
            real_tensor(self, *a, **k)
            if len(calls) == (1 if fail_at == "first" else n_tensors):  # written in part, then the disk is full
                self.disk_full = True
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):  # type: ignore[no-untyped-def]
            real_close(self)
            if getattr(self, "disk_full", False):  # flushing the buffered rest fails on a full disk too
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", tensor)
        monkeypatch.setattr(gguf.GGUFWriter, "close", close)
        with pytest.raises(OSError, match="No space"):
            write_gguf(src, out, "Q4_K_M")
    else:
        real_save = hf_folder.save_file
        n_files = sum(p.suffix == ".safetensors" for p in out.iterdir())

        def save(tensors, filename, *a, **k):  # type: ignore[no-untyped-def]
            calls.append(filename)
            if len(calls) == (1 if fail_at == "first" else n_files):
                _enospc(filename)
            return real_save(tensors, filename, *a, **k)

        monkeypatch.setattr(hf_folder, "save_file", save)
        with pytest.raises(OSError, match="No space"):
            main(["--no-progress", "quantize", str(src), *WRITERS[writer], "-o", str(out), "--force"])
    assert calls, "the injected failure never ran: the writer bypasses the patched function"
    assert _snapshot(out) == before
    assert sorted(p.name for p in work.iterdir()) == [out.name], "temporary files left beside the artifact"


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    """The last step of an atomic folder write moves the old folder aside, then the new one in; if that
    second rename fails, the old folder is back under its name and nothing else is left."""
    from lowbit.core import io

    target = tmp_path / "art"
    target.mkdir()
    (target / "a.txt").write_text("old")
    (target / io.ARTIFACT_MARKERS[0]).write_text("{}")  # a lowbit artifact: --force may replace it
    real, calls = os.replace, []

    def replace(src, dst):  # type: ignore[no-untyped-def]
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError), io.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert len(calls) >= 2 and (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"] and len(list(target.iterdir())) == 2
