"""Stage `validate`: check the Q&A dataset with Great Expectations, apply the policies, split train/eval.

Read top to bottom:

1. Load and normalize `data.source` (tasks/plumbing/dataio.py: formats, schemas, unreadable input ->
   UserError).
2. Compute per-row facts in pandas that an expectation cannot compute itself (facts.py): token length
   after the prompt template (the base model's tokenizer, from tasks.plumbing.loading), whether the
   templated text ends with EOS, control sequences inside user text, the line of an earlier exact
   duplicate, the line of an earlier near-duplicate (near_duplicates.py: word 3-gram Jaccard, an exact
   set-similarity join with prefix filtering, about O(n) on real data, no n^2 pairs).
3. Run the committed GX suite `gx/expectations/qa_rows.json` (checkpoint `qa_rows`, suite.py) on ALL
   input rows. GX is the system of record: the rows a check drops are GX's `unexpected_index_list` (by
   `line`) of that check's row-level expectations. Per check, `data.policies` says `error` (stop) or
   `drop` (policies.py).
4. Stop if more than `data.max_drop_fraction` of the rows would go.
5. Split by a hash of the normalized question + `data.split_salt` (appending rows never moves a row).
6. Run the same checkpoint on the validated rows: every expectation must now pass (uniqueness, no
   train/eval overlap, row-count bounds); this is the contract later stages rely on.
7. Write reports (data_quality.json, Data Docs; reports.py) and then, atomically, data/{train,eval}.jsonl.
   On any failure the run's data/ is absent afterwards, so no later stage can run on stale data.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout
from tasks.plumbing.dataio import LoadedData, load_dataset, resolve_source
from tasks.plumbing.loading import load_tokenizer
from tasks.stages.validate.facts import failure_details, in_both_splits, row_facts
from tasks.stages.validate.policies import (
    apply_policies,
    describe_output_failure,
    refuse_errors,
    refuse_too_many_drops,
)
from tasks.stages.validate.reports import build_report, write_reports, write_split
from tasks.stages.validate.suite import open_checkpoint, run_checkpoint

log = logging.getLogger("qa_lora.validate")


@dataclass
class _Checked:
    """The outcome of the GX runs: the rows kept and the report written."""

    kept: Any
    report: dict[str, Any]


def validate_dataset(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Validate `data.source`, drop or refuse bad rows per policy, write the train/eval split.

    Args:
        cfg: the run's configuration (sections `data`, `base`, `train`).
        run_dir: this run's directory; writes data/, reports/data_quality.json, reports/data_docs/.

    Returns:
        Paths of the split and reports, row counts, detected format and schema.

    Raises:
        UserError: unreadable input, a missing base tokenizer (with the `qa-lora base` hint for the
            tiny base), a check whose policy is `error`, too many drops, or a failed table-level
            expectation; the message names the file, the lines and the check.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    layout = RunLayout.of(run_dir)
    try:
        return _validate(cfg, layout)
    except BaseException:
        if layout.data_dir.exists():  # a failed validation must not leave an older split for later stages
            log.warning("validation failed: removing stale %s", layout.data_dir)
            shutil.rmtree(layout.data_dir, ignore_errors=True)
        raise


def _validate(cfg: Config, layout: RunLayout) -> dict[str, Any]:
    import pandas as pd

    loaded = _load(cfg)
    frame = row_facts(pd.DataFrame(loaded.rows), load_tokenizer(cfg), cfg)
    with tempfile.TemporaryDirectory(prefix="qa-lora-gx-") as work:
        checked = _check(cfg, loaded, frame, layout, Path(work))
    kept = checked.kept
    train, evals = kept[kept["split"] == "train"], kept[kept["split"] == "eval"]
    write_split(layout, train, evals)
    log.info("validated %d of %d rows: %d train, %d eval", len(kept), len(frame), len(train), len(evals))
    return {
        "train": str(layout.train_split),
        "eval": str(layout.eval_split),
        "report": str(layout.data_quality),
        "data_docs": str(layout.data_docs / "index.html"),
        "format": loaded.format,
        "schema": loaded.schema,
        "rows_in": len(frame),
        "rows_out": len(kept),
        "train_rows": len(train),
        "eval_rows": len(evals),
        "dropped": len(checked.report["dropped"]),
    }


def _load(cfg: Config) -> LoadedData:
    d = cfg.data
    path = resolve_source(d.source, d.allowed_roots, REPO_ROOT)
    loaded = load_dataset(path, d.format, d.max_row_bytes)
    log.info("%s: %d rows, format %s, schema %s", path, len(loaded.rows), loaded.format, loaded.schema)
    if len(loaded.rows) > d.max_rows:
        raise UserError(
            f"{path}: {len(loaded.rows)} rows, over data.max_rows={d.max_rows} (check: row_count)"
        )
    return loaded


def _check(cfg: Config, loaded: LoadedData, frame: Any, layout: RunLayout, work: Path) -> _Checked:
    """GX on all input rows, the policies, GX again on the kept rows; the report is written either way."""
    d = cfg.data
    checkpoint, docs_dir = open_checkpoint(work)
    params = {"min_rows": d.min_rows, "max_rows": d.max_rows, "max_length": cfg.train.max_length}
    details = failure_details(frame, cfg)
    failed_input = run_checkpoint(checkpoint, frame, params, "input")
    dropped, errors = apply_policies(failed_input, details, cfg)
    report = build_report(cfg, loaded, frame, dropped, failed_input)
    try:
        refuse_errors(loaded.path, errors, details)
        refuse_too_many_drops(loaded.path, len(frame), dropped, d)
        kept = frame[~frame["line"].isin({item["line"] for item in dropped})].copy()
        kept["in_both_splits"] = in_both_splits(kept)
        failed_output = run_checkpoint(checkpoint, kept, params, "validated")
        report["gx"]["validated_success"] = not failed_output
        if failed_output:
            raise UserError(f"{loaded.path}: {describe_output_failure(failed_output, kept, d)}")
    except UserError as exc:
        report["status"] = "failed"
        report["error"] = str(exc)
        write_reports(layout, report, docs_dir)
        raise
    report["status"] = "passed"
    write_reports(layout, report, docs_dir)
    return _Checked(kept, report)
