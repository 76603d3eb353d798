"""The records of a JSONL, CSV or Parquet file, one at a time: no format is read whole into memory.

Each reader yields `(line, record)` pairs and notes what it could not read in a :class:`Problems`, which
keeps a bounded sample of lines per check (a file can be a million bad lines) and raises one message
once the file has been read: the most fundamental check first (size, then encoding, then syntax). For
Parquet, "line" is the 1-based row number; for CSV it is the physical line where the record starts (a
quoted field may span several lines).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tasks.core.errors import UserError

BOM = b"\xef\xbb\xbf"
_MAX_LINES_SHOWN = 5
_LINES_KEPT = 1000  # per check: enough to name the first lines and count the rest

Records = Iterator[tuple[int, dict[str, Any]]]


def describe_lines(lines: list[int], total: int | None = None) -> str:
    """`line 3` / `lines 3, 7, 9 and 2 more`: short enough for a one-line message.

    Args:
        lines: offending lines (any order; the first few are named).
        total: how many there are in all when `lines` is a sample (default: len(lines)).
    """
    lines = sorted(lines)
    total = len(lines) if total is None else total
    if total == 1:
        return f"line {lines[0]}"
    shown = ", ".join(str(n) for n in lines[:_MAX_LINES_SHOWN])
    more = total - min(_MAX_LINES_SHOWN, len(lines))
    return f"lines {shown}" + (f" and {more} more" if more > 0 else "")


class Problems:
    """Per-line problems by check, so one message can name the offending lines of the first check."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_check: dict[str, list[tuple[int, str]]] = {}
        self.counts: dict[str, int] = {}

    def add(self, check: str, line: int, detail: str) -> None:
        items = self.by_check.setdefault(check, [])
        self.counts[check] = self.counts.get(check, 0) + 1
        if len(items) < _LINES_KEPT:
            items.append((line, detail))

    def raise_first(self, order: tuple[str, ...] = ()) -> None:
        """Raise for the first check in `order` (then in the order first seen) that has problems.

        Raises:
            UserError: `<file>: lines 3, 7 and 2 more: <the first line's problem> (check: <name>)`.
        """
        ranked = [c for c in order if c in self.by_check] + [c for c in self.by_check if c not in order]
        if not ranked:
            return
        check = ranked[0]
        items = self.by_check[check]
        lines = describe_lines([line for line, _ in items], self.counts[check])
        raise UserError(f"{self.path}: {lines}: {items[0][1]} (check: {check})")


def jsonl_records(path: Path, max_row_bytes: int, problems: Problems) -> Records:
    """JSON objects, one per line (blank lines skipped; a BOM on line 1 ignored)."""
    with path.open("rb") as handle:
        for lineno, raw, size in _lines(handle, max_row_bytes):
            if raw is None:
                problems.add(
                    "max_row_bytes", lineno, f"row is {size} bytes, over data.max_row_bytes={max_row_bytes}"
                )
                continue
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            if not raw.strip():
                continue
            bad = _utf8_problem(raw)
            if bad:
                problems.add("utf8", lineno, bad)
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.add("json", lineno, f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                problems.add("json", lineno, f"expected a JSON object per line, got {type(obj).__name__}")
                continue
            yield lineno, obj


JSONL_ORDER = ("max_row_bytes", "utf8", "json")
CSV_ORDER = ("utf8", "max_row_bytes", "csv", "columns")


def csv_records(path: Path, max_row_bytes: int, problems: Problems) -> Records:
    """Rows of a CSV file with a header, as {column: text}; encoding checked per physical line."""
    csv.field_size_limit(max(csv.field_size_limit(), max_row_bytes + 1))  # ours is the limit that speaks
    with path.open("rb") as handle:
        reader = csv.DictReader(_decoded(handle, problems), restkey="__extra__")
        start = 1
        try:
            header = reader.fieldnames  # reads the header, so line_num counts from the first record
            if header is not None and len(set(header)) != len(header):
                raise UserError(
                    f"{path}: line 1: the header repeats a column name: {header} (check: columns)"
                )
            start = reader.line_num + 1
            for record in reader:
                size = sum(len(str(v).encode("utf-8")) for v in record.values() if v is not None)
                if size > max_row_bytes:
                    problems.add(
                        "max_row_bytes",
                        start,
                        f"row is {size} bytes, over data.max_row_bytes={max_row_bytes}",
                    )
                elif "__extra__" in record:
                    problems.add(
                        "columns", start, f"{len(record['__extra__'])} more field(s) than the header names"
                    )
                elif any(v is not None and v.strip() for v in record.values()):
                    yield start, record
                start = reader.line_num + 1
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                problems.add("max_row_bytes", start, f"a field is over data.max_row_bytes={max_row_bytes}")
            else:
                problems.add("csv", start, f"malformed CSV ({exc})")


def parquet_records(path: Path, max_row_bytes: int, problems: Problems, batch_rows: int = 10_000) -> Records:
    """Rows of a Parquet file, a record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        index = 0
        for batch in batches:
            for record in batch.to_pylist():
                index += 1
                size = len(json.dumps(record, default=str).encode("utf-8"))
                if size > max_row_bytes:
                    problems.add(
                        "max_row_bytes",
                        index,
                        f"row is {size} bytes, over data.max_row_bytes={max_row_bytes}",
                    )
                    continue
                yield index, record
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc}) (check: parquet)") from None


def _lines(handle: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes or None when longer than `limit`, size), without reading a huge line whole."""
    lineno = 0
    while True:
        chunk = handle.readline(limit + 1)
        if not chunk:
            return
        lineno += 1
        size = len(chunk)
        if size > limit and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):  # skip the rest of the oversized line
                chunk = handle.readline(1 << 20)
                size += len(chunk)
            yield lineno, None, size
            continue
        yield lineno, chunk.rstrip(b"\r\n"), size


def _decoded(handle: BinaryIO, problems: Problems) -> Iterator[str]:
    """The physical lines of a file as text; a line that is not UTF-8 is noted and decoded with
    replacement characters so the CSV parser keeps its place."""
    for lineno, raw in enumerate(handle, 1):
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        bad = _utf8_problem(raw.rstrip(b"\r\n"))
        if bad:
            problems.add("utf8", lineno, bad)
        yield raw.decode("utf-8", errors="replace")


def _utf8_problem(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start})"
    return None
