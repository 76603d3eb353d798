"""Flat, comparable numbers per stage: what `dvc metrics show` and `dvc exp show` print.

The stages write rich JSON files (train_summary.json, eval/metrics.json, gate.json, export_summary.json,
reports/data_quality.json) full of nested keys, paths, policies and histograms. DVC turns every nested
key of a metrics file into a table column, so those files are plain outputs in dvc.yaml; what dvc.yaml
declares as `metrics` is `<run>/metrics/<stage>.json`, written here after the stage ran: a handful of
numbers a person compares between runs, with short keys that are unique across stages (DVC prefixes a
key with its file path when two files share it) and rounded to 4 significant digits.

    data.json    (validate)  rows_in, rows_out (the rows dropped are the difference)
    train.json   (train)     loss (last logged train loss), eval_loss, tok_s (tokens/s), steps
    eval.json    (evaluate)  <primary metric> of the candidate (e.g. token_f1), base, champ (the same
                             metric of the base model and the registered champion), ci_low (the lower CI
                             bound of candidate - base, what the gate reads), gate (1 passed, 0 failed),
                             unique (share of distinct candidate answers), forget (the forgetting rule:
                             general-text perplexity over the base's, minus 1), harness (the largest drop
                             of an lm-evaluation-harness task's metric, base - candidate), when reported
    export.json  (export)    parity (max |logit diff| ONNX vs PyTorch as a share of export.logits_atol:
                             <= 1 passes), size_mb (ONNX graph), p50_ms (per request as served, batch 1)

Short names and files because `dvc metrics show` puts every key of every file in one row of columns, and
it must fit 200 characters (tests/unit/test_dvc_metrics.py renders the worst case with DVC's own table).

The stages themselves do not know about this file: the runner (`qa-lora <stage>`) calls
:func:`write_stage_metrics` after the stage returned.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json, write_json_atomic
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout, gate_rule, read_gate

log = logging.getLogger("qa_lora.dvc_metrics")

METRICS_DIR = "metrics"


def metrics_file(run_dir: Path | str, stage: str) -> Path:
    """Where the flat metrics of `stage` live: `<run>/metrics/<name>.json` (data, train, eval, export)."""
    name = {"validate": "data", "evaluate": "eval"}.get(stage, stage)
    return RunLayout.of(run_dir).root / METRICS_DIR / f"{name}.json"


def _num(value: Any, digits: int = 4) -> float | int | None:
    """A finite number rounded to `digits` significant digits; ints stay ints; anything else is None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if not isinstance(value, float) or not math.isfinite(value):
        return None
    if value == 0.0:
        return 0.0
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _data(layout: RunLayout) -> dict[str, Any]:
    counts = _get(read_json(layout.data_quality), "counts") or {}
    return {k: _num(counts.get(k)) for k in ("rows_in", "rows_out")}  # dropped: the difference


def _train(layout: RunLayout) -> dict[str, Any]:
    summary = read_json(layout.train_summary)
    return {
        "loss": _num(summary.get("final_train_loss")),
        "eval_loss": _num(summary.get("eval_loss_after")),
        "tok_s": _num(round(summary["tokens_per_second"])) if summary.get("tokens_per_second") else None,
        "steps": _num(summary.get("steps")),
    }


def _evaluate(layout: RunLayout) -> dict[str, Any]:
    gate = read_gate(layout.root)
    primary = str(gate.get("primary_metric") or "token_f1")
    metrics = read_json(layout.eval_metrics)
    base, candidate = (_get(metrics, model) or {} for model in ("base", "candidate"))
    champion = _get(gate, "metrics", "champion") or {}
    ci = _get(gate, "ci", "vs_base", primary) or {}
    unique = next((v for k, v in candidate.items() if k.startswith("distinct")), None)
    # 3 significant digits: finer than any CI on a few hundred eval rows, and 7 columns must fit.
    return {
        primary: _num(candidate.get(primary), 3),
        "base": _num(base.get(primary), 3),
        "champ": _num(champion.get(primary), 3),
        "ci_low": _num(ci.get("low"), 3),
        "gate": int(bool(gate["passed"])),
        "unique": _num(unique, 3),
        # the forgetting rule: candidate perplexity on held-out general text over the base's, minus 1
        "forget": _num(gate_rule(gate, "max_general_ppl_increase").get("value"), 3),
        # lm-evaluation-harness: the largest drop of a task's headline metric, base minus candidate
        "harness": _num(gate_rule(gate, "max_harness_regression").get("value"), 3),
    }


def _export(layout: RunLayout) -> dict[str, Any]:
    summary = read_json(layout.export_summary)
    size = _get(summary, "sizes_bytes", "onnx_fp32")
    diff, atol = _get(summary, "parity", "onnx", "max_abs_diff"), _get(summary, "parity", "onnx", "atol")
    # A share of the tolerance reads at DVC's 5 decimals; a raw 8e-06 would print as 1e-05.
    parity = diff / atol if isinstance(diff, int | float) and isinstance(atol, int | float) and atol else None
    latency = _get(summary, "serving", "candidate", "latency_p50_ms")
    return {
        "parity": _num(parity, 2),
        "size_mb": _num(size / 1e6, 3) if isinstance(size, int | float) else None,
        "p50_ms": _num(latency, 3),
    }


# stage -> (the file it must have written, the flattener)
_STAGES: dict[str, tuple[Callable[[RunLayout], Path], Callable[[RunLayout], dict[str, Any]]]] = {
    "validate": (lambda lay: lay.data_quality, _data),
    "train": (lambda lay: lay.train_summary, _train),
    "evaluate": (lambda lay: lay.eval_metrics, _evaluate),
    "export": (lambda lay: lay.export_summary, _export),
}


def flat_metrics(stage: str, run_dir: Path | str) -> dict[str, float | int] | None:
    """The flat numbers of one stage, read from the files it wrote.

    Args:
        stage: a stage name (validate, train, evaluate, export; others have no metrics).
        run_dir: the run directory the stage wrote to.

    Returns:
        {key: number} without the keys the run did not report, or None when the stage has no
        metrics or its result file is missing (e.g. export after a failed gate).

    Raises:
        UserError: a result file exists but is not valid JSON.
    """
    if stage not in _STAGES:
        return None
    layout = RunLayout.of(run_dir)
    source, flatten = _STAGES[stage]
    if not source(layout).is_file():
        return None
    try:
        flat = flatten(layout)
    except ValueError as exc:
        raise UserError(f"{source(layout)}: not valid JSON ({exc}); re-run the {stage} stage") from None
    return {k: v for k, v in flat.items() if v is not None}


def write_stage_metrics(command: str, run_dir: Path | str) -> list[Path]:
    """Write `<run>/metrics/<stage>.json` for the stage a `qa-lora` command ran (all of them for `run`).

    Args:
        command: the `qa-lora` subcommand (a stage name, or "run").
        run_dir: the run directory.

    Returns:
        The metrics files written (none for stages without metrics).
    """
    stages = list(_STAGES) if command == "run" else [command]
    written = []
    for stage in stages:
        flat = flat_metrics(stage, run_dir)
        if flat is not None:
            written.append(write_json_atomic(metrics_file(run_dir, stage), flat))
            log.info("%s metrics: %s", stage, flat)
    return written
