"""The validated split files (run_dir/data/train.jsonl and eval.jsonl): one reader for every stage.

Validation writes them (tasks/stages/validate); train, evaluate and export read them here, with the same
checks and messages. A row is {id, question, answer, category} and, for a conversation, its `system`
message and the `history` of turns before the last question.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.core.errors import UserError

SPLIT_FIELDS = ("id", "question", "answer", "category")
CONVERSATION_FIELDS = ("system", "history")  # in a split row only when the row has them


def read_split_rows(path: Path, what: str = "split") -> Iterator[dict[str, Any]]:
    """The rows of a split file one at a time (a split can be too large to hold), in file order.

    Train, evaluate and export read the same files; one reader gives them the same checks and messages.

    Raises:
        UserError: a missing file, a line that is not JSON, a missing or non-string field.
    """
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; run `qa-lora validate` first")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            bad = (
                [k for k in SPLIT_FIELDS if not isinstance(row.get(k), str)]
                if isinstance(row, dict)
                else ["*"]
            )
            if bad:
                raise UserError(
                    f"{path}:{lineno}: expected string fields {', '.join(SPLIT_FIELDS)}; missing/bad: {', '.join(bad)}"
                )
            yield {k: row[k] for k in (*SPLIT_FIELDS, *CONVERSATION_FIELDS) if row.get(k)}


def eval_sample(path: Path, n: int, what: str = "eval split") -> list[dict[str, Any]]:
    """The first `n` rows of a split in (id, question) order: the same rows every run, read in one
    streaming pass (bounded memory, whatever the split's size). Ids are content hashes where the data
    has none, so this is a stable pseudo-random sample; evaluate scores it, train measures its eval loss
    on it, export checks parity on its first questions.

    Raises:
        UserError: a missing or empty split, a line that is not JSON, a missing or non-string field.
    """
    rows = heapq.nsmallest(n, read_split_rows(path, what), key=lambda r: (r["id"], r["question"]))
    if not rows:
        raise UserError(f"{path}: the {what} is empty")
    return rows
