"""Stage `validate`: check the Q&A dataset with Great Expectations, apply the policies, split train/eval.

The file is streamed twice, a chunk of rows at a time, so memory stays flat in its size. Read top to
bottom:

1. Open `data.source` (tasks/plumbing/dataio.py: formats, schemas; an unreadable line -> UserError naming
   it, once the file has been read).
2. Pass 1 (facts.py): per row, what an expectation cannot compute itself: the token length of the example
   as the base's chat template renders it, whether it ends with the end-of-turn token, control sequences
   in user text, the split (a hash of the question). Whole-file rules on compact state: exact duplicates
   (64-bit keys), near-duplicates (hashed word 3-grams joined after the pass, near_duplicates.py).
3. Pass 2 (policies.py): the committed GX suite `qa_rows` on every chunk with those facts (suite.py); GX is
   the system of record: the rows a check drops are its `unexpected_index_list` (by `line`). Per check,
   `data.policies` says `error` (stop) or `drop`. Kept rows are written to the split as the chunks go.
4. The `qa_table` suite on the whole file's keys (uniqueness, train/eval overlap, row count), on the input
   for the report, then on the kept rows, where every expectation must pass: the contract later stages
   rely on. A policy `error`, more than `data.max_drop_fraction` dropped, or a failing contract stops here.
5. Reports (data_quality.json; one Data Docs site with every chunk's run and the whole file's; reports.py)
   and, atomically, data/{train,eval}.jsonl. On any failure the run's data/ is absent afterwards, so no
   later stage can run on stale data.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.artifacts import atomic_dir
from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout
from tasks.plumbing.chat import chat_format
from tasks.plumbing.dataio import DatasetReader, resolve_source
from tasks.plumbing.general_text import general_documents, replay_documents
from tasks.plumbing.harness import harness_settings
from tasks.plumbing.loading import load_tokenizer
from tasks.stages.validate.facts import Scan, in_both_splits, scan_rows
from tasks.stages.validate.policies import (
    Outcome,
    check_rows,
    describe_output_failure,
    refuse_errors,
    refuse_too_many_drops,
)
from tasks.stages.validate.reports import SplitWriter, build_report, write_reports
from tasks.stages.validate.suite import ROW_SUITE, TABLE_SUITE, build_docs, open_project, run_checkpoint

log = logging.getLogger("qa_lora.validate")

CHUNK_ROWS = 50_000  # rows per chunk: pass 1's tokenizer batches, pass 2's GX batches


def validate_dataset(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Validate `data.source`, drop or refuse bad rows per policy, write the train/eval split.

    Args:
        cfg: the run's configuration (sections `data`, `base`, `prompt`, `train`).
        run_dir: this run's directory; writes data/, reports/data_quality.json, reports/data_docs/.

    Returns:
        Paths of the split and reports, row counts, detected format and schema, seconds per pass.

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


def _check_general_text(cfg: Config) -> None:
    """The forgetting rule's general text and the replayed text are read here, so a missing or bad file
    stops the run before training rather than at the gate hours later; a base that needs both is told
    both in one message."""
    problems = []
    for what, read in (("forgetting rule", general_documents), ("replay", replay_documents)):
        try:
            found = read(cfg)
        except UserError as exc:
            problems.append(str(exc))
            continue
        if found is not None:
            log.info("%s: %d general documents from %s", what, len(found[0]), found[1])
    if problems:
        raise UserError("; and ".join(problems))


def _validate(cfg: Config, layout: RunLayout) -> dict[str, Any]:
    d = cfg.data
    reader = DatasetReader(
        resolve_source(d.source, d.allowed_roots, REPO_ROOT), d.format, d.max_row_bytes, CHUNK_ROWS
    )
    chat = chat_format(cfg, load_tokenizer(cfg))
    _check_general_text(cfg)
    harness_settings(cfg)  # eval.harness_tasks without the [harness] extra stops here, not at the gate
    started = time.perf_counter()
    scan = scan_rows(cfg, reader, chat)
    seconds = {"pass1_facts_s": round(time.perf_counter() - started, 2)}
    log.info(
        "%s: %d rows, format %s, schema %s: facts in %.1fs",
        reader.path,
        scan.rows,
        reader.format,
        reader.schema,
        seconds["pass1_facts_s"],
    )
    with tempfile.TemporaryDirectory(prefix="qa-lora-gx-") as work:
        context, checkpoints = open_project(Path(work))
        with atomic_dir(layout.data_dir) as tmp:
            writer = SplitWriter(tmp, layout)
            try:
                started = time.perf_counter()
                outcome = check_rows(cfg, reader, scan, checkpoints[ROW_SUITE], writer.write)
                seconds["pass2_checks_s"] = round(time.perf_counter() - started, 2)
            finally:
                writer.close()
            report = _decide(
                cfg, reader, scan, outcome, checkpoints[TABLE_SUITE], layout, (context, Path(work))
            )
    log.info(
        "validated %d of %d rows: %d train, %d eval (%s)", scan.rows - len(outcome.dropped), scan.rows,
        writer.counts["train"], writer.counts["eval"], seconds,
    )  # fmt: skip
    return {
        "train": str(layout.train_split),
        "eval": str(layout.eval_split),
        "report": str(layout.data_quality),
        "data_docs": str(layout.data_docs / "index.html"),
        "format": reader.format,
        "schema": reader.schema,
        "rows_in": scan.rows,
        "rows_out": report["counts"]["rows_out"],
        "train_rows": writer.counts["train"],
        "eval_rows": writer.counts["eval"],
        "dropped": len(outcome.dropped),
        "seconds": seconds,
    }


def _decide(
    cfg: Config,
    reader: DatasetReader,
    scan: Scan,
    outcome: Outcome,
    checkpoint: Any,
    layout: RunLayout,
    gx: tuple[Any, Path],
) -> dict[str, Any]:
    """The whole-file decisions after pass 2; the report and Data Docs are written either way."""
    d = cfg.data
    params = {"min_rows": d.min_rows, "max_rows": d.max_rows}
    overlap = in_both_splits(scan.question_keys, scan.eval_split)
    table_failed = run_checkpoint(
        checkpoint, table_frame(scan, overlap, np.ones(scan.rows, dtype=bool)), params, "input"
    )
    report = build_report(cfg, reader, scan, outcome, table_failed)
    try:
        refuse_errors(reader.path, outcome)
        refuse_too_many_drops(reader.path, scan.rows, outcome.dropped, d)
        failed_output = run_checkpoint(
            checkpoint, table_frame(scan, overlap, outcome.kept), params, "validated"
        )
        report["gx"]["validated_success"] = not failed_output
        if failed_output:
            raise UserError(
                f"{reader.path}: {describe_output_failure(failed_output, int(outcome.kept.sum()), d)}"
            )
    except UserError as exc:
        report["status"] = "failed"
        report["error"] = str(exc)
        write_reports(layout, report, build_docs(*gx))
        raise
    report["status"] = "passed"
    write_reports(layout, report, build_docs(*gx))
    return report


def table_frame(scan: Scan, overlap: np.ndarray, rows: np.ndarray) -> Any:
    """The `qa_table` suite's frame: 64-bit keys of the selected rows (no text; a million rows are MBs)."""
    import pandas as pd

    present = scan.question_keys[rows] != 0
    return pd.DataFrame(
        {
            "line": scan.lines[rows],
            "id_key": scan.id_keys[rows],
            "question_key": pd.Series(scan.question_keys[rows], dtype="Int64").mask(
                ~present
            ),  # NA: no question
            "answer_key": scan.answer_keys[rows],
            "split": np.where(present, np.where(scan.eval_split[rows], "eval", "train"), None),
            "in_both_splits": overlap[rows],
        }
    )
