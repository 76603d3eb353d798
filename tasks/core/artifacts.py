"""Atomic artifacts: a stage writes into a temporary sibling and renames it into place when complete.

A crash (kill -9, OOM, a retried Airflow task) therefore never leaves a half-written directory that a
later stage or the registry could pick up; the next attempt clears the leftover temporary and starts over.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_TMP = ".tmp-"


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


def read_json(path: Path) -> Any:
    """Read a JSON artifact that an earlier stage wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
