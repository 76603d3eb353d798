"""What validation writes: the data-quality report, the Data Docs, and the train/eval split files."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.artifacts import atomic_dir, write_json_atomic
from tasks.core.config import Config
from tasks.core.layout import RunLayout
from tasks.plumbing.dataio import DatasetReader
from tasks.plumbing.splits import CONVERSATION_FIELDS
from tasks.stages.validate.facts import Scan
from tasks.stages.validate.policies import Outcome
from tasks.stages.validate.suite import SUITES

OUTPUT_FIELDS = ("id", "question", "answer", "category")
HIST_BINS = 8


def build_report(
    cfg: Config, reader: DatasetReader, scan: Scan, outcome: Outcome, table_failed: list[dict[str, Any]]
) -> dict[str, Any]:
    """The data-quality report (status "running" until the stage decides): counts, drops, lengths, GX.

    Args:
        cfg: the run's configuration.
        reader: the dataset as read (path, format, schema).
        scan: pass 1's facts of every row.
        outcome: pass 2's decisions (drops, the row suite's failures merged over the chunks).
        table_failed: the table suite's failures on the input.
    """
    lengths = scan.n_tokens[~np.isnan(scan.n_tokens)]
    over = int((lengths > cfg.train.max_length).sum())
    failed = [*outcome.failed.values(), *table_failed]
    return {
        "status": "running",
        "source": str(reader.path),
        "format": reader.format,
        "schema": reader.schema,
        "counts": {
            "rows_in": scan.rows,
            "dropped": len(outcome.dropped),
            "rows_out": scan.rows - len(outcome.dropped),
            "dropped_by_check": dict(Counter(item["check"] for item in outcome.dropped)),
        },
        "policies": cfg.data.policies.model_dump(),
        "dropped": outcome.dropped,
        "chat": scan.chat,
        "token_lengths": _token_lengths(lengths, cfg.train.max_length, scan.chat.get("example")),
        "truncation_rate": round(over / len(lengths), 6) if len(lengths) else 0.0,
        "split": {"salt": cfg.data.split_salt, "eval_fraction": cfg.data.eval_fraction},
        "gx": {
            "suites": list(SUITES),
            "row_suite_batches": outcome.chunks,
            "input_failed": [
                {k: v for k, v in f.items() if k != "lines"}
                | {"rows": f.get("unexpected_count") or len(f["lines"])}
                for f in failed
            ],
            "validated_success": None,
        },
    }


def _token_lengths(lengths: Any, max_length: int, template: str | None) -> dict[str, Any]:
    edges = [int(x) for x in np.linspace(0, max_length, HIST_BINS + 1)]
    counts = [int(((lengths > lo) & (lengths <= hi)).sum()) for lo, hi in pairwise(edges)]
    over = int((lengths > max_length).sum())
    return {
        "template": template,
        "max_length": max_length,
        "histogram": {"edges": edges, "counts": counts, "over_max_length": over},
        "min": int(lengths.min()) if len(lengths) else None,
        "max": int(lengths.max()) if len(lengths) else None,
        "mean": round(float(lengths.mean()), 2) if len(lengths) else None,
        "p95": float(np.percentile(lengths, 95)) if len(lengths) else None,
    }


def write_reports(layout: RunLayout, report: dict[str, Any], docs_dir: Path) -> None:
    """Move the Data Docs built in the private GX project into the run, then write data_quality.json."""
    if docs_dir.is_dir():
        with atomic_dir(layout.data_docs) as tmp:
            shutil.copytree(docs_dir, tmp, dirs_exist_ok=True)
    write_json_atomic(layout.data_quality, report)


class SplitWriter:
    """data/{train,eval}.jsonl written row by row as pass 2 keeps them, into a directory published whole."""

    def __init__(self, directory: Path, layout: RunLayout) -> None:
        self.train = (directory / layout.train_split.name).open("w", encoding="utf-8")
        self.eval = (directory / layout.eval_split.name).open("w", encoding="utf-8")
        self.counts = {"train": 0, "eval": 0}

    def write(self, row: dict[str, Any], is_eval: bool) -> None:
        record = {name: row[name] for name in OUTPUT_FIELDS}
        record.update({k: v for k in CONVERSATION_FIELDS if (v := row.get(k))})
        (self.eval if is_eval else self.train).write(json.dumps(record, ensure_ascii=False) + "\n")
        self.counts["eval" if is_eval else "train"] += 1

    def close(self) -> None:
        self.train.close()
        self.eval.close()
