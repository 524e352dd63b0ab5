"""Atomic writes: a file or a folder appears whole under its final name, or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowbit.core.errors import LowbitError


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def public_mode(path: str | Path, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (0666/0777 less the umask): temp files and
    folders are created 0600/0700, which a serving container running as another user cannot read."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def unique_temp(path: str | Path) -> Path:
    """A new, empty temporary file next to ``path`` (``.NAME.PID.XXXX.partial``): two runs never share one, and
    :func:`clean_stale` recognises those of killed runs."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def publish(tmp: str | Path, path: str | Path) -> None:
    """fsync ``tmp``, give it a plain file's mode, rename it to ``path`` and fsync the folder."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    public_mode(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the temporary files and folders (``.NAME.PID.*.partial``) that runs writing ``path`` left when
    they were killed; those of live processes are kept. Returns what was removed."""
    path = Path(path)
    gone = []
    for p in path.parent.glob(f".{path.name}.*.partial") if path.parent.is_dir() else []:
        pid = p.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def check_replaceable_gguf(path: str | Path) -> None:
    """Refuse to overwrite an existing file that is not a GGUF file (a typo in -o must not destroy data)."""
    p = Path(path)
    if p.is_file() and p.stat().st_size > 0:
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise LowbitError(f"{p} exists and is not a GGUF file; lowbit replaces only GGUF files. "
                                  "Choose another -o or remove it yourself")


#: files that mark a folder as a lowbit artifact (``--force`` replaces only such a folder)
ARTIFACT_MARKERS = ("provenance.json", "recipe.yaml", "lowbit_recipe.json")


def check_output_dir(target: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output folder that cannot be written: an existing file, a non-empty
    folder (unless ``overwrite`` and it is a lowbit artifact), or a place this process cannot write."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise LowbitError(f"output path {target} exists and is not a folder; choose another -o")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise LowbitError(f"output folder {target} is not empty; pass --force to replace it or choose another -o")
        if not any((target / m).is_file() for m in ARTIFACT_MARKERS):
            raise LowbitError(f"output folder {target} is not empty and is not a lowbit artifact; --force replaces "
                              "only artifacts lowbit wrote. Choose another -o or empty it yourself")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LowbitError(f"cannot create {target}: {parent} is a file, not a folder; choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot write to {parent} (permission denied); choose an -o you can write")


def check_output_file(path: str | Path, overwrite: bool = True) -> None:
    """Refuse, before any work, an output file that cannot be written (a folder there, no writable parent,
    or an existing file when not ``overwrite``)."""
    p = Path(path)
    if p.is_dir():
        raise LowbitError(f"{p} is a folder; give a file name")
    if p.exists() and not overwrite:
        raise LowbitError(f"{p} exists; pass --force to replace it")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot write {p}: {parent} is not a writable folder")


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` in one rename.

    On any error the temporary folder is removed and ``target`` is left as it was. An existing,
    non-empty ``target`` is refused unless ``overwrite``.
    """
    target = Path(target)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent))
    public_mode(tmp, folder=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:  # fsync may fail too (ENOSPC, EIO): until the swap is done, a failure leaves target as it was
        for f in tmp.iterdir():  # some writers (safetensors) create files 0600
            public_mode(f, folder=f.is_dir())
        fsync_tree(tmp)  # the files' bytes are on disk before the rename makes the folder visible
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:  # the swap failed half way: put the old folder back, drop the new one
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (a rename into it survives a crash)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file of ``folder`` (one level deep) and the folder itself."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)
