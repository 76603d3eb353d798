"""Reuse an earlier result when its inputs are unchanged: the one fingerprint-and-reuse helper.

A stage (or the tiny-base build) that is expensive writes a small JSON record beside its output, holding
the fingerprint of the inputs that made it. A later call computes the fingerprint of its own inputs and
keeps the earlier output when :func:`reusable` finds a record with the same fingerprint and every file
the output needs; otherwise it rebuilds. :func:`file_lock` serialises builders of one shared output
(parallel test sessions, an Airflow task and a CLI call), so the second one finds the finished build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json

FINGERPRINT_CHARS = 16  # short enough to read in a log line, long enough never to collide here


def fingerprint(payload: Any, files: Iterable[Path] = ()) -> str:
    """Short sha256 of a JSON-able payload and, in order, the names and bytes of `files`.

    Args:
        payload: what decides the result (recipe, params, code version); dict keys are sorted.
        files: input files whose content decides the result; a missing file hashes as "missing".

    Returns:
        The first 16 hex digits. Without `files` it is sha256 of `json.dumps(payload, sort_keys=True)`,
        so a fingerprint recorded before this helper existed still matches.
    """
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for path in files:
        path = Path(path)
        digest.update(b"\0" + path.name.encode() + b"\0")
        if path.is_file():
            with path.open("rb") as handle:  # in chunks: a split file can be hundreds of MB
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        else:
            digest.update(b"missing")
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def reusable(
    record: Path, expected: str, *, required: Iterable[Path] = (), key: str = "fingerprint"
) -> dict[str, Any] | None:
    """The record of an earlier result made from the same inputs, or None when it must be rebuilt.

    Args:
        record: the JSON file written beside the result (a summary or metadata file).
        expected: the fingerprint of the current inputs.
        required: files the result consists of; all must exist (a half-deleted output is rebuilt).
        key: the record's field holding the fingerprint.

    Returns:
        The record as a dict when it is readable, `record[key] == expected` and every required file
        exists; otherwise None (unreadable or foreign records are rebuilt, never trusted).
    """
    record = Path(record)
    if not record.is_file() or not all(Path(p).is_file() for p in required):
        return None
    try:
        data = read_json(record)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get(key) == expected else None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block's duration (the `filelock`
    package, as the registry lock: one file-lock implementation in the project)."""
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield
