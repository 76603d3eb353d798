"""What validation writes: the data-quality report, the Data Docs, and the train/eval split files."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, write_json_atomic
from tasks.core.config import Config
from tasks.core.layout import RunLayout
from tasks.plumbing.dataio import LoadedData
from tasks.plumbing.splits import CONVERSATION_FIELDS
from tasks.stages.validate.suite import SUITE

OUTPUT_FIELDS = ("id", "question", "answer", "category")
HIST_BINS = 8


def build_report(
    cfg: Config, loaded: LoadedData, frame: Any, dropped: list[dict[str, Any]], failed: list[dict[str, Any]]
) -> dict[str, Any]:
    """The data-quality report (status "running" until the stage decides): counts, drops, lengths, GX.

    Args:
        cfg: the run's configuration.
        loaded: the dataset as read (path, format, schema).
        frame: every input row with its facts.
        dropped: the rows the policies drop (an `id` is added to each).
        failed: the failed expectations of the input run.
    """
    ids = dict(zip(frame["line"], frame["id"], strict=True))
    for item in dropped:
        item["id"] = ids.get(item["line"])
    lengths = frame["n_tokens"].dropna().to_numpy()
    over = int((lengths > cfg.train.max_length).sum())
    return {
        "status": "running",
        "source": str(loaded.path),
        "format": loaded.format,
        "schema": loaded.schema,
        "counts": {
            "rows_in": len(frame),
            "dropped": len(dropped),
            "rows_out": len(frame) - len(dropped),
            "dropped_by_check": dict(Counter(item["check"] for item in dropped)),
        },
        "policies": cfg.data.policies.model_dump(),
        "dropped": dropped,
        "chat": frame.attrs.get("chat"),
        "token_lengths": _token_lengths(
            lengths, cfg.train.max_length, (frame.attrs.get("chat") or {}).get("example")
        ),
        "truncation_rate": round(over / len(lengths), 6) if len(lengths) else 0.0,
        "split": {"salt": cfg.data.split_salt, "eval_fraction": cfg.data.eval_fraction},
        "gx": {
            "suite": SUITE,
            "input_failed": [
                {k: v for k, v in f.items() if k != "lines"} | {"rows": len(f["lines"])} for f in failed
            ],
            "validated_success": None,
        },
    }


def _token_lengths(lengths: Any, max_length: int, template: str | None) -> dict[str, Any]:
    import numpy as np

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


def write_split(layout: RunLayout, train: Any, evals: Any) -> None:
    """Write data/{train,eval}.jsonl atomically: both files appear together or not at all."""
    with atomic_dir(layout.data_dir) as tmp:
        _write_jsonl(tmp / layout.train_split.name, train)
        _write_jsonl(tmp / layout.eval_split.name, evals)


def _write_jsonl(path: Path, frame: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in frame.itertuples(index=False):
            record = {name: getattr(row, name) for name in OUTPUT_FIELDS}
            record.update(
                {k: v for k in CONVERSATION_FIELDS if isinstance(v := getattr(row, k), str | list) and v}
            )
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
