"""Pass 2 of validation: the GX row suite on every chunk, `data.policies` per row, the split as it goes.

Each chunk of rows is read again, framed with pass 1's facts (facts.py) and checked by the `qa_rows`
suite; GX is the system of record: the rows a check drops are its `unexpected_index_list` (by `line`).
A failing row is attributed to the first row-level check it fails (ROW_CHECKS order); its policy drops
it or, for `error`, stops the run once every chunk has been seen (so the message names all the lines).
Kept rows go straight to the split files. The decisions that need the whole file (errors, the drop
share, the `qa_table` suite on the kept rows) come after, and raise before the split is published.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.config import Config, DataConfig
from tasks.core.errors import UserError
from tasks.plumbing.dataio import DatasetReader, describe_lines
from tasks.stages.validate.facts import ROW_CHECKS, Scan, reason
from tasks.stages.validate.suite import ROW_COLUMNS, run_checkpoint

_LINES_KEPT = 1000  # per failed expectation in the report and per error check in the message


@dataclass
class Outcome:
    """What pass 2 decided for every row."""

    kept: np.ndarray  # bool per ordinal
    dropped: list[dict[str, Any]] = field(default_factory=list)  # line, check, reason, id
    errors: dict[str, list[int]] = field(default_factory=dict)  # check -> lines (a sample), policy error
    error_counts: Counter[str] = field(default_factory=Counter)
    error_reasons: dict[str, str] = field(default_factory=dict)  # check -> the first line's reason
    failed: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # merged GX failures
    chunks: int = 0


def check_rows(
    cfg: Config,
    reader: DatasetReader,
    scan: Scan,
    checkpoint: Any,
    write: Callable[[dict[str, Any], bool], None],
) -> Outcome:
    """Pass 2: the row suite chunk by chunk, the policies, `write(row, is_eval)` for each kept row."""
    outcome = Outcome(kept=np.zeros(scan.rows, dtype=bool))
    params = {"max_length": cfg.train.max_length}
    start = 0
    for chunk in reader.chunks():
        frame = row_frame(chunk, scan, start)
        name = f"input rows {chunk[0]['line']}-{chunk[-1]['line']}" if chunk else "input (no rows)"
        failed = run_checkpoint(checkpoint, frame, params, name)
        _merge(outcome.failed, failed)
        picked = _first_check(failed)
        for k, row in enumerate(chunk):
            ordinal, check = start + k, picked.get(row["line"])
            if check is None:
                outcome.kept[ordinal] = True
                write(row, bool(scan.eval_split[ordinal]))
            else:
                _decide(cfg, outcome, scan, check, ordinal, row)
        start += len(chunk)
        outcome.chunks += 1
    return outcome


def row_frame(chunk: list[dict[str, Any]], scan: Scan, start: int) -> Any:
    """The chunk's rows with pass 1's facts: the columns the row suite checks."""
    import pandas as pd

    at = range(start, start + len(chunk))
    present = scan.present[start : start + len(chunk)]
    return pd.DataFrame(
        {
            "line": [r["line"] for r in chunk],
            "id": [r["id"] for r in chunk],
            "question": [r["question"] for r in chunk],
            "answer": [r["answer"] for r in chunk],
            "category": [r["category"] for r in chunk],
            "control_sequences": [scan.markers.get(i) for i in at],
            "n_tokens": scan.n_tokens[start : start + len(chunk)],
            "ends_with_eos": [
                bool(e) if p else None
                for e, p in zip(scan.ends_with_eos[at.start : at.stop], present, strict=True)
            ],
            "duplicate_of": [scan.duplicates[i][0] if i in scan.duplicates else None for i in at],
            "duplicate_kind": [scan.duplicates[i][1] if i in scan.duplicates else None for i in at],
            "near_duplicate_of": [scan.near[i][0] if i in scan.near else None for i in at],
            "near_duplicate_score": [scan.near[i][1] if i in scan.near else np.nan for i in at],
            "split": [
                ("eval" if scan.eval_split[i] else "train") if scan.question_keys[i] else None for i in at
            ],
        },
        columns=list(ROW_COLUMNS),
    )


def _first_check(failed: list[dict[str, Any]]) -> dict[int, str]:
    """Line -> the first row-level check (ROW_CHECKS order) the line fails."""
    by_check: dict[str, set[int]] = {}
    for item in failed:
        if item["rows"]:
            by_check.setdefault(item["check"], set()).update(item["lines"])
    picked: dict[int, str] = {}
    for check in ROW_CHECKS:
        for line in by_check.get(check, ()):
            picked.setdefault(line, check)
    return picked


def _decide(cfg: Config, outcome: Outcome, scan: Scan, check: str, ordinal: int, row: dict[str, Any]) -> None:
    why = reason(scan, cfg, check, ordinal, row)
    if getattr(cfg.data.policies, check) == "error":
        lines = outcome.errors.setdefault(check, [])
        if len(lines) < _LINES_KEPT:
            lines.append(row["line"])
        outcome.error_counts[check] += 1
        outcome.error_reasons.setdefault(check, why)
    outcome.dropped.append({"line": row["line"], "check": check, "reason": why, "id": row["id"]})


def _merge(merged: dict[tuple[str, str], dict[str, Any]], failed: list[dict[str, Any]]) -> None:
    """Fold one chunk's failed expectations into the whole file's (lines kept as a bounded sample)."""
    for item in failed:
        key = (item["expectation"], str(item["column"]))
        into = merged.setdefault(key, {**item, "lines": [], "unexpected_count": 0})
        room = _LINES_KEPT - len(into["lines"])
        into["lines"] += item["lines"][: max(0, room)]
        into["unexpected_count"] = (into["unexpected_count"] or 0) + (item["unexpected_count"] or 0)
        into["observed"] = item["observed"]


def refuse_errors(path: Path, outcome: Outcome) -> None:
    """Raise for the first check (ROW_CHECKS order) whose policy is `error`, naming its lines."""
    for check in ROW_CHECKS:
        if check in outcome.errors:
            lines = describe_lines(outcome.errors[check], outcome.error_counts[check])
            raise UserError(
                f"{path}: {lines}: {outcome.error_reasons[check]} (check: {check}; data.policies.{check}=error)"
            )


def refuse_too_many_drops(path: Path, rows_in: int, dropped: list[dict[str, Any]], d: DataConfig) -> None:
    """Raise when the dropped rows exceed `data.max_drop_fraction` of the input."""
    if not rows_in or len(dropped) / rows_in <= d.max_drop_fraction:
        return
    by_check = Counter(item["check"] for item in dropped)
    raise UserError(
        f"{path}: validation would drop {len(dropped)} of {rows_in} rows "
        f"({len(dropped) / rows_in:.1%}), over data.max_drop_fraction={d.max_drop_fraction}; "
        f"by check: {dict(by_check)}; {describe_lines([item['line'] for item in dropped[:_LINES_KEPT]], len(dropped))} "
        "(check: max_drop_fraction)"
    )


def describe_output_failure(failed: list[dict[str, Any]], kept_rows: int, d: DataConfig) -> str:
    """One line for the first expectation the validated rows still fail (row count, uniqueness...)."""
    first = failed[0]
    check = first["check"]
    if check == "row_count":
        return (
            f"{kept_rows} valid rows after validation, outside data.min_rows={d.min_rows}.."
            f"data.max_rows={d.max_rows} (check: row_count)"
        )
    where = f"{describe_lines(first['lines'])}: " if first["lines"] else ""
    return (
        f"{where}the validated rows fail {first['expectation']} on {first['column']} "
        f"(observed {first['observed']!r}) (check: {check})"
    )
