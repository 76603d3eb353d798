"""The Great Expectations side of validation: the two suites, the committed gx/ project, checkpoint runs.

`qa_rows` checks every row, one chunk of the file at a time (a batch per chunk, each a validation run
in the Data Docs); `qa_table` checks what spans the whole file (uniqueness, train/eval overlap, row
count) on one frame of 64-bit keys, first on the input, then on the validated rows. The committed GX project (gx/) is copied into a temporary folder for each run, so concurrent runs do not
share GX's stores and the checkout stays clean. :func:`write_gx_project` (re)creates gx/ from
:func:`expectations`; a test checks that the committed suites match the code. Regenerate it with
`python -c "from tasks.core.config import REPO_ROOT; from tasks.stages.validate import write_gx_project;
write_gx_project(REPO_ROOT)"`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from tasks.core.config import REPO_ROOT
from tasks.core.errors import UserError

log = logging.getLogger("qa_lora.validate")

GX_DIR = "gx"
ROW_SUITE = "qa_rows"  # every row, a chunk of the file at a time (batch per chunk)
TABLE_SUITE = "qa_table"  # the whole file's compact keys: uniqueness, overlap, row count
SUITES = (ROW_SUITE, TABLE_SUITE)
ROW_COLUMNS = (
    "line", "id", "question", "answer", "category", "control_sequences", "n_tokens", "ends_with_eos",
    "duplicate_of", "duplicate_kind", "near_duplicate_of", "near_duplicate_score", "split",
)  # fmt: skip
TABLE_COLUMNS = ("line", "id_key", "question_key", "answer_key", "split", "in_both_splits")


def _row(check: str) -> dict[str, Any]:
    return {"check": check, "rows": True}


def _table(check: str) -> dict[str, Any]:
    return {"check": check, "rows": False}


def expectations() -> dict[str, list[Any]]:
    """The suites. meta.check names the policy; meta.rows marks expectations whose failures pick rows.

    The row suite runs on each chunk of rows with pass 1's facts beside them; the table suite on one
    frame of 64-bit keys for the whole file (no text), so uniqueness is checked across all rows.
    """
    import great_expectations.expectations as gxe

    rows = [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=list(ROW_COLUMNS), exact_match=True, meta=_table("schema")
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="question", meta=_row("blank")),
        gxe.ExpectColumnValuesToNotBeNull(column="answer", meta=_row("blank")),
        gxe.ExpectColumnValuesToMatchRegex(column="question", regex=r"\S", meta=_row("blank")),
        gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=r"\S", meta=_row("blank")),
        gxe.ExpectColumnValuesToBeNull(column="control_sequences", meta=_row("control_tokens")),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_tokens", min_value=1, max_value={"$PARAMETER": "max_length"}, meta=_row("too_long")
        ),
        gxe.ExpectColumnValuesToBeInSet(column="ends_with_eos", value_set=[True], meta=_row("missing_eos")),
        gxe.ExpectColumnValuesToBeNull(column="duplicate_of", meta=_row("duplicate")),
        gxe.ExpectColumnValuesToBeNull(column="near_duplicate_of", meta=_row("near_duplicate")),
        gxe.ExpectColumnValuesToNotBeNull(column="id", meta=_table("schema")),
        gxe.ExpectColumnValuesToNotBeNull(column="category", meta=_table("schema")),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"], meta=_table("split")),
    ]
    table = [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=list(TABLE_COLUMNS), exact_match=True, meta=_table("schema")
        ),
        gxe.ExpectColumnValuesToBeUnique(column="question_key", meta=_table("duplicate")),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["question_key", "answer_key"], meta=_table("duplicate")
        ),
        gxe.ExpectColumnValuesToBeUnique(column="id_key", meta=_table("duplicate")),
        gxe.ExpectColumnValuesToBeInSet(
            column="in_both_splits", value_set=[False], meta=_table("train_eval_overlap")
        ),
        gxe.ExpectTableRowCountToBeBetween(
            min_value={"$PARAMETER": "min_rows"},
            max_value={"$PARAMETER": "max_rows"},
            meta=_table("row_count"),
        ),
    ]
    return {ROW_SUITE: rows, TABLE_SUITE: table}


def write_gx_project(project_root: Path) -> Path:
    """(Re)create the file-backed GX project under project_root/gx: datasource, suites, checkpoints.

    Args:
        project_root: the folder to hold gx/ (the repository root to regenerate the committed one).

    Returns:
        The gx/ folder.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    target = Path(project_root) / GX_DIR
    if target.exists():
        shutil.rmtree(target)
    context = gx.get_context(mode="file", project_root_dir=str(project_root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.variables.save()
    source = context.data_sources.add_pandas("qa_lora")
    for name, suite_expectations in expectations().items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("rows")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in suite_expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        # No Data Docs action: the stage builds the site once, after every chunk's run (stage.py).
        context.checkpoints.add(
            gx.Checkpoint(
                name=name,
                validation_definitions=[definition],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]},
            )
        )
    shutil.rmtree(target / "uncommitted", ignore_errors=True)
    return target


def open_project(work: Path) -> tuple[Any, dict[str, Any]]:
    """A private copy of the committed gx/ project in `work`; returns its context and checkpoints by suite.

    Raises:
        UserError: the committed gx/ project is missing.
    """
    import great_expectations as gx

    # GX logs its plugin registry at INFO; the stage's own log lines say what matters.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    committed = REPO_ROOT / GX_DIR
    if not (committed / "great_expectations.yml").is_file():
        raise UserError(
            f"{committed}: the Great Expectations project is missing (it ships with the repository)"
        )
    shutil.copytree(committed, work / GX_DIR, ignore=shutil.ignore_patterns("uncommitted"))
    context = gx.get_context(mode="file", project_root_dir=str(work))
    return context, {name: context.checkpoints.get(name) for name in SUITES}


def build_docs(context: Any, work: Path) -> Path:
    """Render every stored validation result (each chunk's, the whole file's) into one Data Docs site."""
    context.build_data_docs()
    return work / GX_DIR / "uncommitted" / "data_docs" / "local_site"


def run_checkpoint(checkpoint: Any, frame: Any, params: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Run the suite on `frame` (a run named `name` in the Data Docs); returns the failed expectations."""
    from great_expectations.core.run_identifier import RunIdentifier

    result = checkpoint.run(
        batch_parameters={"dataframe": frame.reset_index(drop=True)},
        expectation_parameters=params,
        run_id=RunIdentifier(run_name=name),
    )
    log.debug(
        "GX checkpoint %s on %s (%d rows): success=%s", checkpoint.name, name, len(frame), result.success
    )
    return _failures(result)


def _failures(result: Any) -> list[dict[str, Any]]:
    """Failed expectations: check, whether it picks rows, the offending lines, GX's observed value."""
    failed = []
    for validation in result.run_results.values():
        for item in validation.results:
            if item.success:
                continue
            config = item.expectation_config
            lines = sorted({int(x["line"]) for x in item.result.get("unexpected_index_list") or []})
            failed.append(
                {
                    "check": config.meta.get("check", config.type),
                    "rows": bool(config.meta.get("rows")),
                    "expectation": config.type,
                    "column": config.kwargs.get("column") or config.kwargs.get("column_list"),
                    "lines": lines,
                    "observed": item.result.get("observed_value"),
                    "unexpected_count": item.result.get("unexpected_count"),
                }
            )
    return failed
