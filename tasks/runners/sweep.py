"""A hyper-parameter sweep inside one pipeline run: candidates that share the run's data; the best goes on.

Each sweep point (a few recipe overrides, e.g. `{"lora.r": 16, "train.learning_rate": 0.003}`) becomes a
candidate run directory `runs/<run>/sweep/c<i>/`: the parent's effective config plus the point, and the
parent's validated, versioned data split (a link, not a copy). Training and evaluation fan out over the
candidates (Airflow dynamic task mapping in dags/qa_lora_sweep.py; the train pool keeps one training at a
time per slot). The best candidate by the gate's primary metric (ties: the smaller LoRA rank, then the
earlier point) is copied into the parent run, whose gate, export and register then run unchanged on it.
Every candidate stays on disk with its reports and MLflow training run; the parent's eval report lists
them all (`eval/sweep.json`, and a "Sweep" section in `eval/eval_report.md`).

Plain Python (no Airflow): the DAG calls these functions, tests call them directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json, write_json_atomic, write_text_atomic
from tasks.core.config import load_config, save_config
from tasks.core.errors import UserError
from tasks.core.layout import EFFECTIVE_PARAMS, RunLayout, read_gate

log = logging.getLogger("qa_lora.sweep")

SWEEP_DIR = "sweep"
# What a point may change: the candidate's recipe. Data, gate, export and registry stay the run's own,
# so candidates are comparable and only the winner reaches the registry.
SWEEPABLE = ("lora.", "train.")
MAX_POINTS = 8


def sweep_points(raw: Any) -> list[dict[str, Any]]:
    """Check a sweep Param: a list of 1..MAX_POINTS objects of `lora.*` / `train.*` overrides.

    Raises:
        UserError: naming the point and key that is not allowed, or what the value should look like.
    """
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_POINTS:
        raise UserError(f"sweep: expected a list of 1 to {MAX_POINTS} objects of overrides, got {raw!r}")
    points = []
    for i, point in enumerate(raw):
        if not isinstance(point, dict) or not point:
            raise UserError(f"sweep[{i}]: expected an object like {{'lora.r': 16}}, got {point!r}")
        bad = sorted(k for k in point if not str(k).startswith(SWEEPABLE))
        if bad:
            raise UserError(
                f"sweep[{i}]: {', '.join(map(repr, bad))} cannot be swept; "
                f"a point changes only {' / '.join(p + '*' for p in SWEEPABLE)} keys"
            )
        points.append(dict(point))
    return points


def prepare_candidates(run_dir: Path, points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One candidate run directory per point, after the parent's data was validated and versioned.

    Returns:
        [{"run_dir", "candidate", "point"}]: small JSON, one per point (what the mapped tasks get).

    Raises:
        UserError: a point the config refuses (unknown key, value out of range), naming the point.
    """
    parent = RunLayout.of(run_dir)
    out = []
    for i, point in enumerate(points):
        try:
            cfg = load_config(parent.effective_params, list(point.items()))
        except UserError as exc:
            raise UserError(f"sweep[{i}]: {exc}") from None
        child = RunLayout.of(parent.root / SWEEP_DIR / f"c{i}")
        child.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, child.effective_params)
        if not child.data_dir.is_symlink():
            os.symlink(os.path.relpath(parent.data_dir, child.root), child.data_dir)
        out.append({"run_dir": str(child.root), "candidate": i, "point": dict(point)})
    log.info("sweep: %d candidates under %s", len(out), parent.root / SWEEP_DIR)
    return out


def pick_winner(run_dir: Path, candidates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rank the evaluated candidates, copy the best into the parent run, list every one in its report.

    Returns:
        {"winner": index, "point", "primary_metric", "candidates": [...]}: small JSON for XCom.
    """
    parent = RunLayout.of(run_dir)
    rows = [_score(c) for c in candidates]
    if not rows:
        raise UserError(f"{parent.root}: the sweep has no evaluated candidate")
    best = min(rows, key=lambda r: (-r["score"], r["lora_r"], r["candidate"]))
    for row in rows:
        row["winner"] = row is best
    _adopt(parent, RunLayout.of(best["run_dir"]))
    summary = {
        "winner": best["candidate"],
        "point": best["point"],
        "primary_metric": best["metric"],
        "candidates": rows,
    }
    write_json_atomic(parent.eval_dir / "sweep.json", summary)
    report = parent.eval_report.read_text(encoding="utf-8")
    write_text_atomic(parent.eval_report, report + "\n" + sweep_section(rows))
    log.info(
        "sweep: candidate %d wins (%s = %.4f): %s",
        best["candidate"],
        best["metric"],
        best["score"],
        best["point"],
    )
    return summary


def _score(candidate: Mapping[str, Any]) -> dict[str, Any]:
    layout = RunLayout.of(candidate["run_dir"])
    gate = read_gate(layout.root)
    metric = str(gate["primary_metric"])
    metrics = read_json(layout.eval_metrics)
    ci = metrics.get("candidate_minus_base", {}).get(metric, {})
    return {
        "candidate": int(candidate["candidate"]),
        "point": dict(candidate["point"]),
        "run_dir": str(layout.root),
        "metric": metric,
        "score": float(metrics["candidate"][metric]),
        "ci_low_vs_base": ci.get("ci_low"),
        "gate_passed": bool(gate["passed"]),
        "lora_r": load_config(layout.effective_params).lora.r,
    }


def _adopt(parent: RunLayout, winner: RunLayout) -> None:
    """The winner's config, adapter and evaluation become the parent run's (each swapped in whole)."""
    for src, dst in ((winner.train_dir, parent.train_dir), (winner.eval_dir, parent.eval_dir)):
        tmp = dst.with_name(dst.name + ".sweep-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints"))
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    tmp = parent.effective_params.with_name(EFFECTIVE_PARAMS + ".sweep-tmp")
    shutil.copyfile(winner.effective_params, tmp)
    tmp.replace(parent.effective_params)


def sweep_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """The eval report's table of every candidate, best first."""
    metric = rows[0]["metric"]
    lines = [
        "## Sweep",
        "",
        f"| candidate | overrides | {metric} | CI low vs base | gate | run dir |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["score"]):
        mark = " (winner)" if r["winner"] else ""
        low = "n/a" if r["ci_low_vs_base"] is None else f"{r['ci_low_vs_base']:+.4f}"
        lines.append(
            f"| c{r['candidate']}{mark} | `{json.dumps(r['point'])}` | {r['score']:.4f} | {low} | "
            f"{'pass' if r['gate_passed'] else 'fail'} | {r['run_dir']} |"
        )
    return "\n".join(lines) + "\n"
