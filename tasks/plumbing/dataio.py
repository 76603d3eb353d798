"""Load a Q&A dataset from JSONL, CSV or Parquet and normalize it to one schema.

Not a stage: `tasks.stages.validate` calls it. Every problem that makes a file unreadable (a path outside the
allowed roots, bad UTF-8, a malformed JSON line, an oversized row, missing columns, wrong types, an
empty file) raises :class:`tasks.core.errors.UserError` with ONE line of the form

    <file>: line 12: <what is wrong> (check: <name>)
    <file>: lines 3, 7, 9 and 2 more: <what is wrong at the first one> (check: <name>)

so a person can find the rows. For Parquet, "line" is the 1-based row number. For CSV it is the
physical line where the record starts (a quoted field may span several lines).

Accepted schemas (auto-detected from the column names, reported as `schema`):

- ``question_answer``:   {question, answer} + optional id, category, context
- ``prompt_completion``: {prompt, completion} (TRL's prompt-completion format)
- ``messages``:          {messages: [{role, content}, ...]}: [system], then user/assistant turns ending
  with an assistant turn (the earlier turns are kept; the loss covers every assistant turn)
- ``llama2_text``:       {text: "<s>[INST] question [/INST] answer </s>"} (the reference walkthrough's
  guanaco-llama2 format)

Every row becomes {line, id, question, answer, category, system, history}: the last user turn, the answer
to it, the row's own system message (or None) and the turns before the last question (empty for a
single Q&A). An optional `context` is folded into the question (so the model sees it); a missing id
becomes a hash of the question (and the turns before it), which stays stable when rows are appended.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tasks.core.errors import UserError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
SCHEMAS = ("question_answer", "prompt_completion", "messages", "llama2_text")
DEFAULT_CATEGORY = "general"
_BOM = b"\xef\xbb\xbf"
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_LLAMA2_RE = re.compile(
    r"^\s*(?:<s>)?\s*\[INST\]\s*(?P<q>.*?)\s*\[/INST\]\s*(?P<a>.*?)\s*(?:</s>)?\s*$", re.DOTALL
)
_MAX_LINES_SHOWN = 5


@dataclass
class LoadedData:
    """A dataset read from disk, normalized: one dict per row plus what was detected."""

    path: Path
    format: str
    schema: str
    rows: list[dict[str, Any]] = field(default_factory=list)


def normalize_question(text: str) -> str:
    """The form used for duplicates and the split: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dialogue_key(question: str, history: list[dict[str, str]] | None = None) -> str:
    """What duplicates and the split compare: the question, after the turns before it (if any)."""
    if not history:
        return normalize_question(question)
    return normalize_question("\n".join([*(t["content"] for t in history), question]))


def resolve_source(source: str, allowed_roots: tuple[str, ...] | list[str], repo_root: Path) -> Path:
    """`data.source` as an absolute path, refused unless it lies (symlinks followed) in an allowed root.

    Raises:
        UserError: a URI, a path outside `data.allowed_roots`, or a file that does not exist.
    """
    if _URI_RE.match(source):
        scheme = source.split("://", 1)[0]
        raise UserError(
            f"data.source {source!r}: {scheme}:// URIs are not supported yet; use a local file under "
            f"data.allowed_roots {list(allowed_roots)} (s3://, gs://, azure:// and http(s):// sources are "
            "planned through DVC's remote filesystems)"
        )
    path = Path(source)
    path = (path if path.is_absolute() else repo_root / path).resolve()
    roots = [(Path(r) if Path(r).is_absolute() else repo_root / r).resolve() for r in allowed_roots]
    if not any(path.is_relative_to(root) for root in roots):
        raise UserError(
            f"data.source {source!r} resolves to {path}, outside data.allowed_roots "
            f"{[str(r) for r in roots]}; move the file under one of them or add its folder to data.allowed_roots"
        )
    if not path.is_file():
        raise UserError(f"{path}: data.source not found (expected a JSONL, CSV or Parquet file)")
    return path


def detect_format(path: Path, fmt: str = "auto") -> str:
    """`jsonl`, `csv` or `parquet`: the configured format, or the one the file extension names."""
    if fmt != "auto":
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise UserError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            f"use one of {sorted(FORMATS)} or set data.format"
        )
    return found


def load_dataset(path: Path, fmt: str = "auto", max_row_bytes: int = 65_536) -> LoadedData:
    """Read, detect the schema and normalize every row.

    Args:
        path: the data file (already resolved by :func:`resolve_source`).
        fmt: `auto` (from the extension), `jsonl`, `csv` or `parquet`.
        max_row_bytes: a row larger than this (encoded) is refused.

    Returns:
        The normalized rows with the detected format and schema.

    Raises:
        UserError: one line naming the file, the line numbers and the failed check.
    """
    fmt = detect_format(path, fmt)
    reader = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[fmt]
    records = reader(path, max_row_bytes)
    if not records:
        raise UserError(f"{path}: empty file: no rows to validate (check: empty)")
    schema = _detect_schema(path, records)
    problems = _Problems(path)
    rows = []
    for line, record in records:
        row = _normalize(schema, line, record, problems)
        if row is not None:
            rows.append(row)
    problems.raise_first()
    return LoadedData(path=path, format=fmt, schema=schema, rows=rows)


# ------------------------------------------------------------------------------------------ problems


def describe_lines(lines: list[int]) -> str:
    """`line 3` / `lines 3, 7, 9 and 2 more`: short enough for a one-line message."""
    lines = sorted(lines)
    if len(lines) == 1:
        return f"line {lines[0]}"
    shown = ", ".join(str(n) for n in lines[:_MAX_LINES_SHOWN])
    more = len(lines) - _MAX_LINES_SHOWN
    return f"lines {shown}" + (f" and {more} more" if more > 0 else "")


class _Problems:
    """Collects per-line problems so one message can name every offending line of the first check."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_check: dict[str, list[tuple[int, str]]] = {}

    def add(self, check: str, line: int, detail: str) -> None:
        self.by_check.setdefault(check, []).append((line, detail))

    def raise_first(self) -> None:
        if not self.by_check:
            return
        check, items = next(iter(self.by_check.items()))
        lines = [line for line, _ in items]
        raise UserError(f"{self.path}: {describe_lines(lines)}: {items[0][1]} (check: {check})")


# ------------------------------------------------------------------------------------------- readers


def _iter_lines(handle: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
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


def _utf8_problem(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start})"
    return None


def _read_jsonl(path: Path, max_row_bytes: int) -> list[tuple[int, dict[str, Any]]]:
    problems = _Problems(path)
    records: list[tuple[int, dict[str, Any]]] = []
    with path.open("rb") as handle:
        for lineno, raw, size in _iter_lines(handle, max_row_bytes):
            if raw is None:
                problems.add(
                    "max_row_bytes", lineno, f"row is {size} bytes, over data.max_row_bytes={max_row_bytes}"
                )
                continue
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            bad = _utf8_problem(raw)
            if bad:
                problems.add("utf8", lineno, bad)
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except json.JSONDecodeError as exc:
                problems.add("json", lineno, f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                problems.add("json", lineno, f"expected a JSON object per line, got {type(obj).__name__}")
                continue
            records.append((lineno, obj))
    _raise_in_order(problems, ("max_row_bytes", "utf8", "json"))
    return records


def _raise_in_order(problems: _Problems, order: tuple[str, ...]) -> None:
    """Report the most fundamental check first (size before encoding before syntax)."""
    problems.by_check = {k: problems.by_check[k] for k in order if k in problems.by_check}
    problems.raise_first()


def _read_csv(path: Path, max_row_bytes: int) -> list[tuple[int, dict[str, Any]]]:
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    problems = _Problems(path)
    for lineno, raw in enumerate(data.split(b"\n"), 1):  # encoding is checked per physical line
        bad = _utf8_problem(raw)
        if bad:
            problems.add("utf8", lineno, bad)
    problems.raise_first()
    text = data.decode("utf-8")
    if not text.strip():
        return []
    # The csv module refuses fields over its limit; keep ours the one that speaks.
    csv.field_size_limit(max(csv.field_size_limit(), max_row_bytes + 1))
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="__extra__")
    records: list[tuple[int, dict[str, Any]]] = []
    start = 1
    try:
        _ = reader.fieldnames  # reads the header, so line_num counts from the first record
        start = reader.line_num + 1
        for record in reader:
            size = sum(len(str(v).encode("utf-8")) for v in record.values() if v is not None)
            if size > max_row_bytes:
                problems.add(
                    "max_row_bytes", start, f"row is {size} bytes, over data.max_row_bytes={max_row_bytes}"
                )
            elif "__extra__" in record:
                problems.add(
                    "columns", start, f"{len(record['__extra__'])} more field(s) than the header names"
                )
            elif any(v is not None and v.strip() for v in record.values()):
                records.append((start, record))
            start = reader.line_num + 1
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            problems.add("max_row_bytes", start, f"a field is over data.max_row_bytes={max_row_bytes}")
        else:
            problems.add("csv", start, f"malformed CSV ({exc})")
    _raise_in_order(problems, ("max_row_bytes", "csv", "columns"))
    if reader.fieldnames is not None and len(set(reader.fieldnames)) != len(reader.fieldnames):
        raise UserError(
            f"{path}: line 1: the header repeats a column name: {reader.fieldnames} (check: columns)"
        )
    return records


def _read_parquet(path: Path, max_row_bytes: int) -> list[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc}) (check: parquet)") from None
    problems = _Problems(path)
    records: list[tuple[int, dict[str, Any]]] = []
    for index, record in enumerate(table.to_pylist(), 1):
        size = len(json.dumps(record, default=str).encode("utf-8"))
        if size > max_row_bytes:
            problems.add(
                "max_row_bytes", index, f"row is {size} bytes, over data.max_row_bytes={max_row_bytes}"
            )
            continue
        records.append((index, record))
    problems.raise_first()
    return records


# ------------------------------------------------------------------------------------------- schemas


def _detect_schema(path: Path, records: list[tuple[int, dict[str, Any]]]) -> str:
    columns: set[str] = set()
    for _, record in records:
        columns.update(record)
    if "messages" in columns:
        return "messages"
    if {"question", "answer"} <= columns:
        return "question_answer"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "llama2_text"
    raise UserError(
        f"{path}: missing columns: found {sorted(columns)}, expected one of "
        "{question, answer} | {prompt, completion} | {messages} | {text} (check: columns)"
    )


_REQUIRED = {
    "question_answer": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "llama2_text": ("text",),
}


def _text(value: Any, column: str, line: int, problems: _Problems) -> str | None:
    """A text cell: a string (stripped), None for null; anything else is a type error."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from a dataframe-backed source
        return None
    if not isinstance(value, str):
        problems.add(
            "types", line, f"column {column!r} must be a string, got {type(value).__name__} {value!r:.40}"
        )
        return None
    return value.strip()


def _normalize(schema: str, line: int, record: dict[str, Any], problems: _Problems) -> dict[str, Any] | None:
    missing = [c for c in _REQUIRED[schema] if c not in record]
    if missing:
        problems.add("columns", line, f"missing column(s) {missing} for schema {schema}")
        return None
    system, history = None, []
    if schema == "question_answer":
        question = _text(record["question"], "question", line, problems)
        answer = _text(record["answer"], "answer", line, problems)
        context = _text(record.get("context"), "context", line, problems)
        if question and context:
            question = f"{question}\n\nContext: {context}"
    elif schema == "prompt_completion":
        question = _text(record["prompt"], "prompt", line, problems)
        answer = _text(record["completion"], "completion", line, problems)
    elif schema == "messages":
        question, answer, system, history = _from_messages(record["messages"], line, problems)
    else:
        text = _text(record["text"], "text", line, problems)
        if text is None:
            question = answer = None
        else:
            match = _LLAMA2_RE.match(text)
            if match is None:
                problems.add("schema", line, "text is not '<s>[INST] question [/INST] answer </s>'")
                return None
            question, answer = match["q"], match["a"]
    category = _text(record.get("category"), "category", line, problems) or DEFAULT_CATEGORY
    raw_id = record.get("id")
    if isinstance(raw_id, bool) or (raw_id is not None and not isinstance(raw_id, (str, int))):
        problems.add("types", line, f"column 'id' must be a string or integer, got {type(raw_id).__name__}")
        return None
    if raw_id is None or str(raw_id).strip() == "":
        # Stable under appends: the id depends on the row's own question (and turns) only.
        raw_id = hashlib.sha1(dialogue_key(question or f"line {line}", history).encode()).hexdigest()[:12]
    return {
        "line": line,
        "id": str(raw_id).strip(),
        "question": question,
        "answer": answer,
        "category": category,
        "system": system,
        "history": history,
    }


def _from_messages(
    messages: Any, line: int, problems: _Problems
) -> tuple[str | None, str | None, str | None, list[dict[str, str]]]:
    """(last question, its answer, system message, the turns before the last question)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        problems.add("types", line, "column 'messages' must be a list of {role, content} objects")
        return None, None, None, []
    roles = [m.get("role") for m in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    alternating = all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns))
    if not turns or len(turns) % 2 or not alternating:
        problems.add(
            "schema",
            line,
            f"messages must be [system], then user/assistant turns ending with an assistant turn, got roles {roles}",
        )
        return None, None, None, []
    contents = [
        _text(m.get("content"), f"messages[{i}].content", line, problems) for i, m in enumerate(messages)
    ]
    system = contents[0] if roles[0] == "system" else None
    talk = contents[1:] if system is not None or roles[0] == "system" else contents
    history = [
        {"role": role, "content": text or ""} for role, text in zip(turns[:-2], talk[:-2], strict=True)
    ]
    return talk[-2], talk[-1], system or None, history
