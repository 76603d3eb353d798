"""Stage `validate`: check the Q&A dataset with Great Expectations, apply the policies, split train/eval.

Read top to bottom:

1. Load and normalize `data.source` (tasks/dataio.py: formats, schemas, unreadable input -> UserError).
2. Compute per-row facts in pandas that an expectation cannot compute itself: token length after the
   prompt template (tokenizer of `base.name_or_path`), whether the templated text ends with EOS,
   control sequences (template markers and the tokenizer's special tokens) inside user text, the line
   of an earlier exact duplicate, the line of an earlier near-duplicate (word 3-gram Jaccard, exact
   set-similarity join with prefix filtering: about O(n) on real data, no n^2 pairs).
3. Run the committed GX suite `gx/expectations/qa_rows.json` (checkpoint `qa_rows`) on ALL input rows.
   GX is the system of record: the rows a check drops are GX's `unexpected_index_list` (by `line`) of
   that check's row-level expectations. Per check, `data.policies` says `error` (stop) or `drop`.
4. Stop if more than `data.max_drop_fraction` of the rows would go.
5. Split by a hash of the normalized question + `data.split_salt` (appending rows never moves a row).
6. Run the same checkpoint on the validated rows: every expectation must now pass (uniqueness, no
   train/eval overlap, row-count bounds); this is the contract later stages rely on.
7. Write reports (data_quality.json, Data Docs) and then, atomically, run_dir/data/{train,eval}.jsonl.
   On any failure run_dir/data is absent afterwards, so no later stage can run on stale data.

The committed GX project (gx/) is copied into a temporary folder for each run, so concurrent runs do not
share GX's stores and the checkout stays clean; the Data Docs built there are moved to
run_dir/reports/data_docs/. `_write_gx_project` (re)creates gx/ from `_expectations()`; a test checks
that the committed suite matches the code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, write_json_atomic
from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import UserError
from tasks.plumbing.dataio import LoadedData, describe_lines, load_dataset, normalize_question, resolve_source
from tasks.plumbing.prompting import find_control_sequences, format_completion, format_prompt

log = logging.getLogger("qa_lora.validate")

GX_DIR = "gx"
SUITE = "qa_rows"
# Row-level checks, in the order a row is attributed to one of them (the first it fails).
ROW_CHECKS = ("blank", "control_tokens", "too_long", "missing_eos", "duplicate", "near_duplicate")
OUTPUT_FIELDS = ("id", "question", "answer", "category")
_HIST_BINS = 8


def validate_dataset(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Validate `data.source`, drop or refuse bad rows per policy, write the train/eval split.

    Args:
        cfg: the run's configuration (sections `data`, `base`, `train`).
        run_dir: this run's directory; writes data/, reports/data_quality.json, reports/data_docs/.

    Returns:
        Paths of the split and reports, row counts, detected format and schema.

    Raises:
        UserError: unreadable input, a check whose policy is `error`, too many drops, or a failed
            table-level expectation; the message names the file, the lines and the check.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    run_dir = Path(run_dir)
    data_out = run_dir / "data"
    try:
        return _validate(cfg, run_dir, data_out)
    except BaseException:
        if data_out.exists():  # a failed validation must not leave an older split for later stages
            log.warning("validation failed: removing stale %s", data_out)
            shutil.rmtree(data_out, ignore_errors=True)
        raise


def _validate(cfg: Config, run_dir: Path, data_out: Path) -> dict[str, Any]:
    import pandas as pd

    d = cfg.data
    path = resolve_source(d.source, d.allowed_roots, REPO_ROOT)
    loaded = load_dataset(path, d.format, d.max_row_bytes)
    rows_in = len(loaded.rows)
    log.info("%s: %d rows, format %s, schema %s", path, rows_in, loaded.format, loaded.schema)
    if rows_in > d.max_rows:
        raise UserError(f"{path}: {rows_in} rows, over data.max_rows={d.max_rows} (check: row_count)")

    tokenizer = _load_tokenizer(cfg)
    frame = _row_facts(pd.DataFrame(loaded.rows), tokenizer, cfg)
    details = _details(frame, cfg)

    reports = run_dir / "reports"
    with tempfile.TemporaryDirectory(prefix="qa-lora-gx-") as work:
        checkpoint, docs_dir = _open_checkpoint(Path(work))
        params = {"min_rows": d.min_rows, "max_rows": d.max_rows, "max_length": cfg.train.max_length}
        failed_input = _failures(_run_checkpoint(checkpoint, frame, params, "input"))
        dropped, errors = _apply_policies(failed_input, details, cfg)
        report = _report(cfg, loaded, frame, dropped, failed_input)
        try:
            for check, lines in errors:
                raise UserError(
                    f"{path}: {describe_lines(lines)}: {details[check][lines[0]]} "
                    f"(check: {check}; data.policies.{check}=error)"
                )
            drop_lines = {item["line"] for item in dropped}
            if rows_in and len(drop_lines) / rows_in > d.max_drop_fraction:
                by_check = Counter(item["check"] for item in dropped)
                raise UserError(
                    f"{path}: validation would drop {len(drop_lines)} of {rows_in} rows "
                    f"({len(drop_lines) / rows_in:.1%}), over data.max_drop_fraction={d.max_drop_fraction}; "
                    f"by check: {dict(by_check)}; {describe_lines(sorted(drop_lines))} "
                    "(check: max_drop_fraction)"
                )
            kept = frame[~frame["line"].isin(drop_lines)].copy()
            kept["in_both_splits"] = _in_both_splits(kept)
            failed_output = _failures(_run_checkpoint(checkpoint, kept, params, "validated"))
            report["gx"]["validated_success"] = not failed_output
            if failed_output:
                raise UserError(f"{path}: {_describe_output_failure(failed_output, kept, d)}")
        except UserError as exc:
            report["status"] = "failed"
            report["error"] = str(exc)
            _write_reports(reports, report, docs_dir)
            raise
        report["status"] = "passed"
        _write_reports(reports, report, docs_dir)

    train = kept[kept["split"] == "train"]
    evals = kept[kept["split"] == "eval"]
    with atomic_dir(data_out) as tmp:
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "eval.jsonl", evals)
    log.info("validated %d of %d rows: %d train, %d eval", len(kept), rows_in, len(train), len(evals))
    return {
        "train": str(data_out / "train.jsonl"),
        "eval": str(data_out / "eval.jsonl"),
        "report": str(reports / "data_quality.json"),
        "data_docs": str(reports / "data_docs" / "index.html"),
        "format": loaded.format,
        "schema": loaded.schema,
        "rows_in": rows_in,
        "rows_out": len(kept),
        "train_rows": len(train),
        "eval_rows": len(evals),
        "dropped": len(report["dropped"]),
    }


# ------------------------------------------------------------------------------------------ row facts


def _load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    name = cfg.base.name_or_path
    local = cfg.resolve(name)
    if cfg.base.kind == "tiny" and not (local / "tokenizer_config.json").is_file():
        raise UserError(
            f"{local}: no tokenizer (base.name_or_path={name!r}); build the tiny base first: `qa-lora base`"
        )
    source = str(local) if local.exists() else name
    try:
        return AutoTokenizer.from_pretrained(
            source, revision=cfg.base.revision, trust_remote_code=cfg.base.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"base.name_or_path={name!r}: cannot load its tokenizer ({first}); "
            "for the embedded tiny base run `qa-lora base`"
        ) from None


def _row_facts(frame: Any, tokenizer: Any, cfg: Config) -> Any:
    """Add the per-row columns the suite checks: lengths, EOS, control sequences, duplicates, split."""
    present = frame["question"].notna() & frame["answer"].notna()
    present &= frame["question"].fillna("").str.strip().ne("") & frame["answer"].fillna("").str.strip().ne("")
    frame["question_norm"] = [normalize_question(q) if q else None for q in frame["question"]]

    specials = tuple(sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())))
    frame["control_sequences"] = [
        ", ".join(sorted(set(find_control_sequences(f"{q}\n{a}", specials)))) or None if ok else None
        for q, a, ok in zip(frame["question"], frame["answer"], present, strict=True)
    ]

    texts = [
        format_prompt(q) + format_completion(a)
        for q, a in zip(frame["question"][present], frame["answer"][present], strict=True)
    ]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    eos_id = tokenizer.eos_token_id
    frame["n_tokens"] = float("nan")
    frame.loc[present, "n_tokens"] = [float(len(x)) for x in ids]
    frame["ends_with_eos"] = None
    frame.loc[present, "ends_with_eos"] = [bool(x) and eos_id is not None and x[-1] == eos_id for x in ids]

    # Exact and near duplicates among rows that pass the content checks, first occurrence kept (a
    # bad first copy must not take a good second copy down with it).
    max_length = cfg.train.max_length
    content_ok = (
        present
        & frame["control_sequences"].isna()
        & (frame["n_tokens"] <= max_length)
        & frame["ends_with_eos"].fillna(False).astype(bool)
    )
    frame["duplicate_of"] = None
    frame["duplicate_kind"] = None
    seen_q: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    for idx in frame.index[content_ok]:
        line, qn, rid = int(frame.at[idx, "line"]), frame.at[idx, "question_norm"], frame.at[idx, "id"]
        if qn in seen_q:
            frame.at[idx, "duplicate_of"] = seen_q[qn]
            frame.at[idx, "duplicate_kind"] = "question"
        elif rid in seen_id:
            frame.at[idx, "duplicate_of"] = seen_id[rid]
            frame.at[idx, "duplicate_kind"] = "id"
        else:
            seen_q[qn] = line
            seen_id[rid] = line
    frame["near_duplicate_of"] = None
    frame["near_duplicate_score"] = float("nan")
    candidates = frame.index[content_ok & frame["duplicate_of"].isna()]
    matches = _near_duplicates(
        [frame.at[i, "question_norm"] for i in candidates], cfg.data.near_duplicate_threshold
    )
    for pos, (other, score) in matches.items():
        idx = candidates[pos]
        frame.at[idx, "near_duplicate_of"] = int(frame.at[candidates[other], "line"])
        frame.at[idx, "near_duplicate_score"] = score

    frame["split"] = [
        _split_of(qn, cfg.data.split_salt, cfg.data.eval_fraction) if qn else None
        for qn in frame["question_norm"]
    ]
    frame["in_both_splits"] = _in_both_splits(frame)
    return frame


def _shingles(text: str) -> set[tuple[str, ...]]:
    import re

    words = re.findall(r"\w+", text)
    if len(words) < 3:
        return {tuple(words)}
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def _near_duplicates(texts: list[str], threshold: float) -> dict[int, tuple[int, float]]:
    """Index -> (earlier kept index, Jaccard) for texts whose word 3-gram Jaccard >= threshold.

    Exact set-similarity join with prefix filtering (Chaudhuri et al. 2006; Bayardo et al. 2007): with
    tokens ordered rarest first, two sets with Jaccard >= t share a token among the first
    |x| - ceil(t*|x|) + 1 tokens of each. Only those prefixes are indexed, and candidates are verified
    exactly, so the cost is about linear in the rows for real text (no all-pairs comparison).
    """
    sets = [_shingles(t) for t in texts]
    freq = Counter(tok for s in sets for tok in s)
    rank = {tok: r for r, (tok, _) in enumerate(sorted(freq.items(), key=lambda kv: (kv[1], kv[0])))}
    index: dict[int, list[int]] = {}
    found: dict[int, tuple[int, float]] = {}
    for i, s in enumerate(sets):
        if not s:
            continue
        ordered = sorted(rank[tok] for tok in s)
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1]
        best: tuple[int, float] | None = None
        for j in sorted({j for tok in prefix for j in index.get(tok, ())}):
            other = sets[j]
            if not threshold * len(s) <= len(other) <= len(s) / threshold:
                continue
            score = len(s & other) / len(s | other)
            if score >= threshold:
                best = (j, score)
                break  # the earliest kept match
        if best is not None:
            found[i] = best
            continue
        for tok in prefix:
            index.setdefault(tok, []).append(i)
    return found


def _split_of(question_norm: str, salt: str, eval_fraction: float) -> str:
    """`eval` or `train`, from a hash of the question alone: adding other rows never moves this one."""
    digest = hashlib.sha256(f"{salt}\x00{question_norm}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


def _in_both_splits(frame: Any) -> list[bool]:
    splits: dict[str, set[str]] = {}
    for qn, split in zip(frame["question_norm"], frame["split"], strict=True):
        if qn:
            splits.setdefault(qn, set()).add(split)
    return [bool(qn) and len(splits[qn]) > 1 for qn in frame["question_norm"]]


def _details(frame: Any, cfg: Config) -> dict[str, dict[int, str]]:
    """Check -> line -> why that row fails it (the human reason in errors and in the drop list)."""
    out: dict[str, dict[int, str]] = {check: {} for check in ROW_CHECKS}
    out["train_eval_overlap"] = {}
    for row in frame.itertuples(index=False):
        line = int(row.line)
        blank = [c for c in ("question", "answer") if not (getattr(row, c) or "").strip()]
        if blank:
            out["blank"][line] = f"{' and '.join(blank)} {'is' if len(blank) == 1 else 'are'} empty or null"
        if row.control_sequences:
            out["control_tokens"][line] = f"user text contains control sequence(s) {row.control_sequences}"
        if row.n_tokens == row.n_tokens:  # not NaN
            out["too_long"][line] = (
                f"{int(row.n_tokens)} tokens after the prompt template, over train.max_length={cfg.train.max_length}"
            )
        out["missing_eos"][line] = "the templated example does not end with the EOS token"
        if row.duplicate_of is not None:
            what = "question" if row.duplicate_kind == "question" else "id"
            out["duplicate"][line] = f"duplicate {what} of line {int(row.duplicate_of)}"
        if row.near_duplicate_of is not None:
            out["near_duplicate"][line] = (
                f"near-duplicate question of line {int(row.near_duplicate_of)} "
                f"(word 3-gram Jaccard {row.near_duplicate_score:.2f} >= {cfg.data.near_duplicate_threshold})"
            )
        out["train_eval_overlap"][line] = "the question is in both train and eval"
    return out


# ------------------------------------------------------------------------------------ Great Expectations


def _expectations() -> list[Any]:
    """The suite. meta.check names the policy; meta.rows marks expectations whose failures pick rows."""
    import great_expectations.expectations as gxe

    def row(check: str) -> dict[str, Any]:
        return {"check": check, "rows": True}

    def table(check: str) -> dict[str, Any]:
        return {"check": check, "rows": False}

    columns = [
        "line", "id", "question", "answer", "category", "question_norm", "control_sequences",
        "n_tokens", "ends_with_eos", "duplicate_of", "duplicate_kind", "near_duplicate_of",
        "near_duplicate_score", "split", "in_both_splits",
    ]  # fmt: skip
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=True, meta=table("schema")),
        gxe.ExpectColumnValuesToNotBeNull(column="question", meta=row("blank")),
        gxe.ExpectColumnValuesToNotBeNull(column="answer", meta=row("blank")),
        gxe.ExpectColumnValuesToMatchRegex(column="question", regex=r"\S", meta=row("blank")),
        gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=r"\S", meta=row("blank")),
        gxe.ExpectColumnValuesToBeNull(column="control_sequences", meta=row("control_tokens")),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_tokens", min_value=1, max_value={"$PARAMETER": "max_length"}, meta=row("too_long")
        ),
        gxe.ExpectColumnValuesToBeInSet(column="ends_with_eos", value_set=[True], meta=row("missing_eos")),
        gxe.ExpectColumnValuesToBeNull(column="duplicate_of", meta=row("duplicate")),
        gxe.ExpectColumnValuesToBeNull(column="near_duplicate_of", meta=row("near_duplicate")),
        gxe.ExpectColumnValuesToNotBeNull(column="id", meta=table("schema")),
        gxe.ExpectColumnValuesToNotBeNull(column="category", meta=table("schema")),
        gxe.ExpectColumnValuesToBeUnique(column="question_norm", meta=table("duplicate")),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["question_norm", "answer"], meta=table("duplicate")),
        gxe.ExpectColumnValuesToBeUnique(column="id", meta=table("duplicate")),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"], meta=table("split")),
        gxe.ExpectColumnValuesToBeInSet(
            column="in_both_splits", value_set=[False], meta=table("train_eval_overlap")
        ),
        gxe.ExpectTableRowCountToBeBetween(
            min_value={"$PARAMETER": "min_rows"},
            max_value={"$PARAMETER": "max_rows"},
            meta=table("row_count"),
        ),
    ]


def _write_gx_project(project_root: Path) -> Path:
    """(Re)create the file-backed GX project under project_root/gx: datasource, suite, checkpoint."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    target = project_root / GX_DIR
    if target.exists():
        shutil.rmtree(target)
    context = gx.get_context(mode="file", project_root_dir=str(project_root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.variables.save()
    batch = (
        context.data_sources.add_pandas("qa_lora")
        .add_dataframe_asset("qa_rows")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE))
    for expectation in _expectations():
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=SUITE, data=batch, suite=suite)
    )
    context.checkpoints.add(
        gx.Checkpoint(
            name=SUITE,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]},
        )
    )
    shutil.rmtree(target / "uncommitted", ignore_errors=True)
    return target


def _open_checkpoint(work: Path) -> tuple[Any, Path]:
    """A private copy of the committed gx/ project; returns its checkpoint and Data Docs folder."""
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
    return context.checkpoints.get(SUITE), work / GX_DIR / "uncommitted" / "data_docs" / "local_site"


def _run_checkpoint(checkpoint: Any, frame: Any, params: dict[str, Any], name: str) -> Any:
    from great_expectations.core.run_identifier import RunIdentifier

    # GX renders object columns; plain Python values keep the docs and unexpected lists readable.
    result = checkpoint.run(
        batch_parameters={"dataframe": frame.reset_index(drop=True)},
        expectation_parameters=params,
        run_id=RunIdentifier(run_name=name),
    )
    log.info("GX checkpoint %s on %s rows (%d): success=%s", SUITE, name, len(frame), result.success)
    return result


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


def _apply_policies(
    failed: list[dict[str, Any]], details: dict[str, dict[int, str]], cfg: Config
) -> tuple[list[dict[str, Any]], list[tuple[str, list[int]]]]:
    """(dropped rows with reasons, [(check, lines)] for checks whose policy is `error`)."""
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


def _describe_output_failure(failed: list[dict[str, Any]], kept: Any, d: Any) -> str:
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


# --------------------------------------------------------------------------------------------- outputs


def _report(
    cfg: Config, loaded: LoadedData, frame: Any, dropped: list[dict[str, Any]], failed: list[dict[str, Any]]
) -> dict[str, Any]:
    import numpy as np

    lengths = frame["n_tokens"].dropna().to_numpy()
    max_length = cfg.train.max_length
    edges = [int(x) for x in np.linspace(0, max_length, _HIST_BINS + 1)]
    counts = [int(((lengths > lo) & (lengths <= hi)).sum()) for lo, hi in pairwise(edges)]
    over = int((lengths > max_length).sum())
    ids = dict(zip(frame["line"], frame["id"], strict=True))
    for item in dropped:
        item["id"] = ids.get(item["line"])
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
        "token_lengths": {
            "template": "<s>" + format_prompt("{question}") + format_completion("{answer}"),
            "max_length": max_length,
            "histogram": {"edges": edges, "counts": counts, "over_max_length": over},
            "min": int(lengths.min()) if len(lengths) else None,
            "max": int(lengths.max()) if len(lengths) else None,
            "mean": round(float(lengths.mean()), 2) if len(lengths) else None,
            "p95": float(np.percentile(lengths, 95)) if len(lengths) else None,
        },
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


def _write_reports(reports: Path, report: dict[str, Any], docs_dir: Path) -> None:
    if docs_dir.is_dir():
        with atomic_dir(reports / "data_docs") as tmp:
            shutil.copytree(docs_dir, tmp, dirs_exist_ok=True)
    write_json_atomic(reports / "data_quality.json", report)


def _write_jsonl(path: Path, frame: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in frame.itertuples(index=False):
            record = {name: getattr(row, name) for name in OUTPUT_FIELDS}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
