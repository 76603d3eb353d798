"""Read a Q&A dataset from JSONL, CSV or Parquet in chunks and normalize it to one schema.

Not a stage: `tasks.stages.validate` streams it through :class:`DatasetReader` (the format readers are in
tasks/plumbing/readers.py; no format is read whole). Every problem that makes a file unreadable (a path outside the
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

import hashlib
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.errors import UserError
from tasks.plumbing.readers import (
    CSV_ORDER,
    JSONL_ORDER,
    Problems,
    csv_records,
    describe_lines,
    jsonl_records,
    parquet_records,
)

__all__ = ["DatasetReader", "LoadedData", "describe_lines", "load_dataset", "resolve_source"]

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
SCHEMAS = ("question_answer", "prompt_completion", "messages", "llama2_text")
DEFAULT_CATEGORY = "general"
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_LLAMA2_RE = re.compile(
    r"^\s*(?:<s>)?\s*\[INST\]\s*(?P<q>.*?)\s*\[/INST\]\s*(?P<a>.*?)\s*(?:</s>)?\s*$", re.DOTALL
)


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


class DatasetReader:
    """A Q&A file read in chunks of normalized rows: memory stays flat in the file's size.

    The schema is detected from the columns of the first chunk's records. Problems (unreadable lines,
    wrong types, missing columns) are collected while reading and raised as ONE line once the file has
    been read (the first check's lines named), so a bad line deep in a large file is still reported by
    its number, and nothing downstream has been written by then.
    """

    def __init__(self, path: Path, fmt: str = "auto", max_row_bytes: int = 65_536, chunk_rows: int = 50_000):
        self.path = path
        self.format = detect_format(path, fmt)
        self.max_row_bytes = max_row_bytes
        self.chunk_rows = chunk_rows
        self.schema: str | None = None

    def chunks(self) -> Iterator[list[dict[str, Any]]]:
        """Lists of normalized rows ({line, id, question, answer, category, system, history}).

        Raises:
            UserError: after the last chunk, for the first problem found (or an empty file).
        """
        read = Problems(self.path)
        rows = Problems(self.path)
        reader, order = _READERS[self.format]
        records = reader(self.path, self.max_row_bytes, read)
        seen = 0
        for batch in _batched(records, self.chunk_rows):
            seen += len(batch)
            if self.schema is None:
                self.schema = _detect_schema(self.path, batch)
            normalized = [_normalize(self.schema, line, record, rows) for line, record in batch]
            yield [row for row in normalized if row is not None]
        read.raise_first(order)
        if not seen:
            raise UserError(f"{self.path}: empty file: no rows to validate (check: empty)")
        rows.raise_first()


def load_dataset(path: Path, fmt: str = "auto", max_row_bytes: int = 65_536) -> LoadedData:
    """Read, detect the schema and normalize every row (all in memory: for small files and tests; the
    validate stage streams through :class:`DatasetReader`).

    Raises:
        UserError: one line naming the file, the line numbers and the failed check.
    """
    reader = DatasetReader(path, fmt, max_row_bytes)
    rows = [row for chunk in reader.chunks() for row in chunk]
    return LoadedData(path=path, format=reader.format, schema=reader.schema or "", rows=rows)


_READERS = {
    "jsonl": (jsonl_records, JSONL_ORDER),
    "csv": (csv_records, CSV_ORDER),
    "parquet": (parquet_records, ()),
}


def _batched(
    records: Iterator[tuple[int, dict[str, Any]]], size: int
) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    batch: list[tuple[int, dict[str, Any]]] = []
    for item in records:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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


def _text(value: Any, column: str, line: int, problems: Problems) -> str | None:
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


def _normalize(schema: str, line: int, record: dict[str, Any], problems: Problems) -> dict[str, Any] | None:
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
    messages: Any, line: int, problems: Problems
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
