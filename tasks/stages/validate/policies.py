"""From GX failures to decisions: which rows are dropped, which checks stop the run, and the messages."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tasks.core.config import Config, DataConfig
from tasks.core.errors import UserError
from tasks.plumbing.dataio import describe_lines
from tasks.stages.validate.facts import ROW_CHECKS


def apply_policies(
    failed: list[dict[str, Any]], details: dict[str, dict[int, str]], cfg: Config
) -> tuple[list[dict[str, Any]], list[tuple[str, list[int]]]]:
    """Attribute each failing row to the first row-level check it fails, then apply `data.policies`.

    Args:
        failed: the failed expectations of the input run (see suite.run_checkpoint).
        details: check -> line -> reason (see facts.failure_details).
        cfg: reads `data.policies`.

    Returns:
        (dropped rows with line, check and reason, sorted by line; [(check, lines)] for the checks
        whose policy is `error`).
    """
    lines_by_check: dict[str, set[int]] = {}
    for item in failed:
        if item["rows"]:
            lines_by_check.setdefault(item["check"], set()).update(item["lines"])
    dropped: list[dict[str, Any]] = []
    errors: list[tuple[str, list[int]]] = []
    taken: set[int] = set()
    for check in ROW_CHECKS:
        lines = sorted(lines_by_check.get(check, set()) - taken)
        if not lines:
            continue
        taken.update(lines)
        if getattr(cfg.data.policies, check) == "error":
            errors.append((check, lines))
        for line in lines:
            dropped.append({"line": line, "check": check, "reason": details[check].get(line, check)})
    dropped.sort(key=lambda item: item["line"])
    return dropped, errors


def refuse_errors(
    path: Path, errors: list[tuple[str, list[int]]], details: dict[str, dict[int, str]]
) -> None:
    """Raise for the first check whose policy is `error`, naming its lines and the first line's reason."""
    if errors:
        check, lines = errors[0]
        raise UserError(
            f"{path}: {describe_lines(lines)}: {details[check][lines[0]]} "
            f"(check: {check}; data.policies.{check}=error)"
        )


def refuse_too_many_drops(path: Path, rows_in: int, dropped: list[dict[str, Any]], d: DataConfig) -> None:
    """Raise when the dropped rows exceed `data.max_drop_fraction` of the input."""
    drop_lines = {item["line"] for item in dropped}
    if not rows_in or len(drop_lines) / rows_in <= d.max_drop_fraction:
        return
    by_check = Counter(item["check"] for item in dropped)
    raise UserError(
        f"{path}: validation would drop {len(drop_lines)} of {rows_in} rows "
        f"({len(drop_lines) / rows_in:.1%}), over data.max_drop_fraction={d.max_drop_fraction}; "
        f"by check: {dict(by_check)}; {describe_lines(sorted(drop_lines))} "
        "(check: max_drop_fraction)"
    )


def describe_output_failure(failed: list[dict[str, Any]], kept: Any, d: DataConfig) -> str:
    """One line for the first expectation the validated rows still fail (row count, uniqueness...)."""
    first = failed[0]
    check = first["check"]
    if check == "row_count":
        return (
            f"{len(kept)} valid rows after validation, outside data.min_rows={d.min_rows}.."
            f"data.max_rows={d.max_rows} (check: row_count)"
        )
    where = f"{describe_lines(first['lines'])}: " if first["lines"] else ""
    return (
        f"{where}the validated rows fail {first['expectation']} on {first['column']} "
        f"(observed {first['observed']!r}) (check: {check})"
    )
