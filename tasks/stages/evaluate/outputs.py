"""What the evaluate stage writes: run_dir/eval/ as one atomic directory.

metrics.json (per-model metrics and candidate-minus-X CIs, for `dvc metrics`), gate.json (the decision,
read by `tasks.core.layout.read_gate`), slices.json, predictions.jsonl, plots/{models,slices}.csv (for
`dvc plots`), comparison.png and eval_report.md (see report.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir
from tasks.core.config import Config
from tasks.core.layout import RunLayout, gate_rule
from tasks.stages.evaluate.harness import RULE as HARNESS_RULE
from tasks.stages.evaluate.metrics import ROW_METRICS, bootstrap_ci, metric_array, slice_indices
from tasks.stages.evaluate.records import (
    MODELS,
    TABLE_COLUMNS,
    Evaluation,
    Results,
    finite,
    gated_metrics,
)
from tasks.stages.evaluate.report import render_report

log = logging.getLogger("qa_lora.evaluate")


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 6)
    return obj


def model_cis(cfg: Config, results: Results) -> dict[str, Any]:
    """Per model, the bootstrap CI of each primary metric's mean (the chart's error bars)."""
    e = cfg.eval
    return {
        model: {
            m: bootstrap_ci(metric_array(rows, m), e.bootstrap_samples, e.confidence, e.seed)
            for m in gated_metrics(cfg)
        }
        for model, rows in results.items()
        if rows is not None
    }


def write_outputs(cfg: Config, layout: RunLayout, ev: Evaluation) -> Path:
    """Write every eval artifact into `layout.eval_dir`, atomically (all of them or none).

    Returns:
        The eval directory.
    """
    slices = slice_table(cfg, ev.results, ev.gate["comparisons"])
    with atomic_dir(layout.eval_dir) as tmp:
        _write_json(tmp / layout.eval_metrics.name, _metrics_json(ev))
        _write_json(tmp / layout.gate_file.name, _gate_json(cfg, ev))
        _write_json(tmp / "slices.json", slices)
        _write_predictions(tmp / "predictions.jsonl", ev)
        plots = tmp / "plots"
        plots.mkdir()
        _write_csv(plots / "models.csv", _models_table(ev.summary, ev.model_cis))
        _write_csv(plots / "slices.csv", _slices_long(slices))
        _plot(cfg, ev.summary, ev.model_cis, tmp / "comparison.png")
        (tmp / layout.eval_report.name).write_text(render_report(cfg, ev, slices), encoding="utf-8")
    log.info("wrote %s", layout.eval_dir)
    return layout.eval_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_clean(obj), indent=2) + "\n", encoding="utf-8")


def _metrics_json(ev: Evaluation) -> dict[str, Any]:
    comps = ev.gate["comparisons"]
    out: dict[str, Any] = {
        m: {k: v for k, v in s.items() if math.isfinite(v)}
        for m in MODELS
        if (s := ev.summary[m]) is not None
    }
    for label, comp in (
        ("candidate_minus_base", comps["vs_base"]),
        ("candidate_minus_champion", comps["vs_champion"]),
    ):
        if comp is not None:
            out[label] = {
                m: {"mean": ci["mean"], "ci_low": ci["low"], "ci_high": ci["high"]}
                for m, ci in comp["overall"].items()
            }
    out["gate"] = {"passed": int(ev.gate["passed"]), "failed_rules": len(ev.gate["reasons"])}
    harness = gate_rule(ev.gate, HARNESS_RULE).get("tasks")
    if harness is not None:  # lm-evaluation-harness: per task, base and candidate on its headline metric
        out["harness"] = {
            task: {k: t[k] for k in ("metric", "base", "candidate", "change")} for task, t in harness.items()
        }
    return out


def _gate_json(cfg: Config, ev: Evaluation) -> dict[str, Any]:
    gate, comps = ev.gate, ev.gate["comparisons"]
    return {
        "passed": gate["passed"],
        "decision": gate["decision"],
        "primary_metric": gate["primary_metric"],
        "rules": gate["rules"],
        "reasons": gate["reasons"],
        "champion_version": gate["champion_version"],
        "metrics": {m: ev.summary[m] for m in MODELS},
        "ci": {
            "confidence": cfg.eval.confidence,
            "bootstrap_samples": cfg.eval.bootstrap_samples,
            "seed": cfg.eval.seed,
            "vs_base": comps["vs_base"]["overall"],
            "vs_champion": comps["vs_champion"]["overall"] if comps["vs_champion"] else None,
        },
        "champion": dict(ev.champion) if ev.champion else None,
        "eval_rows": len(ev.rows),
    }


def _write_predictions(path: Path, ev: Evaluation) -> None:
    """One line per eval row: the row, and per model its prediction, scores and answer loss."""
    keys = ("prediction", *ROW_METRICS, "ended_with_eos", "empty", "gen_tokens")
    with path.open("w", encoding="utf-8") as fh:
        for i, row in enumerate(ev.rows):
            rec: dict[str, Any] = dict(row)
            for m in MODELS:
                res = ev.results[m]
                if res is not None:
                    r = res[i]
                    rec[m] = {k: finite(r[k]) for k in keys}
                    rec[m]["loss"] = r["nll_sum"] / max(r["n_answer_tokens"], 1)
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def slice_table(cfg: Config, results: Results, comps: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per category: size, each model's primary metrics, the candidate's deltas and CIs."""
    metrics = gated_metrics(cfg)
    cand = results["candidate"]
    assert cand is not None
    table = []
    for name, idx in slice_indices(cand).items():
        entry: dict[str, Any] = {
            "category": name,
            "n": int(idx.size),
            "gated": int(idx.size) >= cfg.gate.min_slice_size,
        }
        for model in MODELS:
            res = results[model]
            if res is not None:
                entry[model] = {m: float(metric_array(res, m)[idx].mean()) for m in metrics}
        entry["vs_base"] = comps["vs_base"]["slices"][name]
        entry["vs_champion"] = comps["vs_champion"]["slices"][name] if comps["vs_champion"] else None
        table.append(entry)
    return table


def _models_table(
    summary: Mapping[str, dict[str, float] | None], cis: Mapping[str, Any]
) -> list[dict[str, Any]]:
    out = []
    for model in MODELS:
        s = summary[model]
        if s is None:
            continue
        rec: dict[str, Any] = {"model": model, **{c: round(s[c], 6) for c in TABLE_COLUMNS if c in s}}
        for m, ci in cis[model].items():
            rec[f"{m}_ci_low"], rec[f"{m}_ci_high"] = round(ci["low"], 6), round(ci["high"], 6)
        out.append(rec)
    return out


def _slices_long(slices: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "category": s["category"],
            "n": s["n"],
            "model": model,
            **{k: round(v, 6) for k, v in s[model].items()},
        }
        for s in slices
        for model in MODELS
        if s.get(model)
    ]


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _plot(cfg: Config, summary: Mapping[str, Any], cis: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: per primary metric, the models side by side, with bootstrap CI error bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers; must precede pyplot
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = gated_metrics(cfg)
    models = [m for m in MODELS if summary[m] is not None]
    colors = {"base": "#9e9e9e", "candidate": "#1f77b4", "champion": "#ff7f0e"}
    x = np.arange(len(metrics))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(metrics), 4))
    for k, model in enumerate(models):
        ci = cis[model]
        means = [ci[m]["mean"] for m in metrics]
        err = [
            [ci[m]["mean"] - ci[m]["low"] for m in metrics],
            [ci[m]["high"] - ci[m]["mean"] for m in metrics],
        ]
        offset = (k - (len(models) - 1) / 2) * width
        bars = ax.bar(x + offset, means, width, yerr=err, capsize=3, label=model, color=colors[model])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, label_type="center", color="white")
    ax.set_xticks(x, metrics)
    ax.set_ylabel("mean over eval rows")
    ax.set_ylim(0, min(1.05, max(0.1, 1.25 * max(cis[m][k]["high"] for m in models for k in metrics))))
    ax.set_title(f"base vs candidate vs champion ({cfg.eval.confidence:.0%} bootstrap CIs)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
