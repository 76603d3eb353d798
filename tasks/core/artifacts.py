"""Atomic artifacts: a stage writes into a temporary sibling and renames it into place when complete.

A crash (kill -9, OOM, a retried Airflow task) therefore never leaves a half-written directory that a
later stage or the registry could pick up; the next attempt clears the leftover temporary and starts over.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.core.errors import OutOfSpace

_TMP = ".tmp-"
_MIB = 2**20


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success replace `final` with it.

    On an exception the temporary is removed and `final` (if it existed) is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_TMP}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f"{_TMP}old-{final.name}"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def write_json_atomic(path: Path, payload: Any) -> Path:
    """Write JSON to `path` via a temporary file and an atomic rename (see :func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text to `path` via a temporary file and an atomic rename.

    The temporary's name is unique per call: processes that share a file (the eval cache, the precision
    verdicts, parallel test workers) never write into each other's temporary; the last rename wins whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{_TMP}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(name, 0o644)  # mkstemp creates 0600; a shared cache is read by other users' tasks too
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """Read a JSON artifact that an earlier stage wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextmanager
def disk_space(path: Path, needed: int, what: str) -> Iterator[None]:
    """Refuse before writing `what` (about `needed` bytes) under `path` when its filesystem lacks them,
    and turn a full disk met while writing (ENOSPC, EDQUOT) into the same one line.

    Use it around an :func:`atomic_dir` block: the temporary is removed on the way out, so a full disk
    leaves nothing half-written and frees what the attempt took.

    Raises:
        OutOfSpace: naming the path, the space needed and the space free.
    """
    path = Path(path)
    probe = next(p for p in (path, *path.parents) if p.exists())

    def error() -> OutOfSpace:
        free = shutil.disk_usage(probe).free
        return OutOfSpace(
            f"{path}: no space for {what}: needs about {needed / _MIB:.1f} MiB, {free / _MIB:.1f} MiB free "
            "on its filesystem; free space (e.g. `qa-lora gc`) and retry"
        )

    if shutil.disk_usage(probe).free < needed:
        raise error()
    try:
        yield
    except Exception as exc:
        if not disk_full(exc):
            raise
        raise error() from None


def disk_full(exc: BaseException | None) -> bool:
    """Whether an exception, or one in its chain, is a full disk (libraries wrap ENOSPC in their own)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in ("No space left on device", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
