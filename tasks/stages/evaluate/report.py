"""eval_report.md: the gate's decision and why, the models side by side, slices, regressions, samples.

Written for a person reviewing a candidate (the DAG's approval step links to it); every number in it is
also in metrics.json, gate.json or slices.json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.core.config import Config
from tasks.core.layout import gate_rule, rule_purpose
from tasks.stages.evaluate.harness import RULE as HARNESS_RULE
from tasks.stages.evaluate.records import MODELS, TABLE_COLUMNS, Evaluation, gated_metrics

Lines = list[str]


def render_report(cfg: Config, ev: Evaluation, slices: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown report of one evaluation.

    Args:
        cfg: the configuration (eval and gate settings are quoted in the report).
        ev: the evaluation (rows, per-model results and summaries, gate, champion, timings).
        slices: `outputs.slice_table`'s per-category entries.
    """
    models = [m for m in MODELS if ev.summary[m] is not None]
    lines = _header(cfg, ev)
    lines += _models_section(ev, models)
    lines += _bootstrap_section(cfg, ev)
    lines += _rules_section(ev)
    lines += _harness_section(ev)
    lines += _slices_section(cfg, slices, models)
    lines += _regressions_section(cfg, ev)
    lines += _samples_section(ev, models)
    lines += ["## Timing", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ev.timings.items()]
    lines += [
        "",
        "Files: metrics.json, gate.json, slices.json, predictions.jsonl, comparison.png, plots/.",
        "",
    ]
    return "\n".join(lines)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _md_escape(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _header(cfg: Config, ev: Evaluation) -> Lines:
    champion = ev.champion
    lines = [
        "# Evaluation report",
        "",
        f"**Gate: {'PASSED' if ev.gate['passed'] else 'FAILED'}** (primary metric `{cfg.gate.primary_metric}`; "
        f"{len(ev.rows)} eval rows; champion: "
        f"{'version ' + str(champion['version']) if champion else 'none registered yet'})",
        "",
    ]
    if ev.gate["reasons"]:
        lines += ["Reasons:", ""] + [f"- {r}" for r in ev.gate["reasons"]] + [""]
    return lines


def _models_section(ev: Evaluation, models: Sequence[str]) -> Lines:
    cols = TABLE_COLUMNS
    lines = ["## Models", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in models:
        s = ev.summary[m]
        assert s is not None
        lines.append(f"| {m} | " + " | ".join(_fmt(s.get(c)) for c in cols) + " |")
    cand = ev.summary["candidate"]
    ref_words = cand.get("reference_words_mean") if cand else None
    return [*lines, "", f"Reference answers average {_fmt(ref_words, 1)} words.", ""]


def _bootstrap_section(cfg: Config, ev: Evaluation) -> Lines:
    e = cfg.eval
    comps = ev.gate["comparisons"]
    lines = [
        f"## Paired bootstrap ({e.confidence:.0%} CI, {e.bootstrap_samples} resamples, seed {e.seed})",
        "",
        "| comparison | metric | mean difference | CI low | CI high |",
        "|---|---|---|---|---|",
    ]
    for label, comp in (
        ("candidate − base", comps["vs_base"]),
        ("candidate − champion", comps["vs_champion"]),
    ):
        if comp is None:
            continue
        for m in gated_metrics(cfg):
            ci = comp["overall"][m]
            lines.append(f"| {label} | {m} | {ci['mean']:+.4f} | {ci['low']:+.4f} | {ci['high']:+.4f} |")
    return lines


def _rules_section(ev: Evaluation) -> Lines:
    lines = [
        "",
        "## Gate rules",
        "",
        "| rule | protects | passed | value | threshold | detail |",
        "|---|---|---|---|---|---|",
    ]
    for r in ev.gate["rules"]:
        lines.append(
            f"| `{r['name']}` | {rule_purpose(r['name'])} | {'yes' if r['passed'] else '**NO**'} | "
            f"{_fmt(r['value'])} | {_fmt(r['threshold'])} | {_md_escape(r['detail'], 400)} |"
        )
    return lines


def _harness_section(ev: Evaluation) -> Lines:
    """lm-evaluation-harness: per task, base and candidate on its headline metric (± the harness's stderr)."""
    tasks = gate_rule(ev.gate, HARNESS_RULE).get("tasks")
    if not tasks:
        return []
    lines = [
        "",
        "## lm-evaluation-harness tasks",
        "",
        "| task | metric | base | candidate | change |",
        "|---|---|---|---|---|",
    ]
    for name, t in sorted(tasks.items()):
        base, cand = (
            f"{t[k]:.3f}" + (f" ± {t[k + '_stderr']:.3f}" if t.get(k + "_stderr") is not None else "")
            for k in ("base", "candidate")
        )
        lines.append(f"| {name} | {t['metric']} | {base} | {cand} | {t['change']:+.3f} |")
    return lines


def _slices_section(cfg: Config, slices: Sequence[Mapping[str, Any]], models: Sequence[str]) -> Lines:
    pm = cfg.gate.primary_metric
    lines = [
        "",
        f"## Slices by category (`{pm}`; slices with >= {cfg.gate.min_slice_size} rows gate)",
        "",
        "| category | rows | gated | " + " | ".join(models) + " | cand − base | cand − champion |",
        "|---" * (len(models) + 5) + "|",
    ]
    for s in slices:
        vc = s["vs_champion"][pm]["mean"] if s["vs_champion"] else None
        lines.append(
            f"| {s['category']} | {s['n']} | {'yes' if s['gated'] else 'no'} | "
            + " | ".join(_fmt(s[m][pm], 3) for m in models)
            + f" | {s['vs_base'][pm]['mean']:+.3f} | {_fmt(vc, 3) if vc is None else f'{vc:+.3f}'} |"
        )
    return lines


def _regressions_section(cfg: Config, ev: Evaluation) -> Lines:
    """Rows the champion answered exactly and the candidate no longer does, then large drops."""
    lines = ["", "## Regressions: the champion answered right, the candidate now does not", ""]
    cand, champ, rows = ev.results["candidate"], ev.results["champion"], ev.rows
    assert cand is not None
    if champ is None:
        return [*lines, "No champion yet."]
    pm = cfg.gate.primary_metric
    lost = [i for i in range(len(rows)) if champ[i]["exact_match"] == 1.0 and cand[i]["exact_match"] < 1.0]
    drops = sorted(
        (i for i in range(len(rows)) if champ[i][pm] - cand[i][pm] >= 0.5 and i not in lost),
        key=lambda i: cand[i][pm] - champ[i][pm],
    )
    lines.append(
        f"{len(lost)} rows the champion matched exactly are no longer exact; {len(drops)} more lost >= 0.5 `{pm}`."
    )
    picked = (lost + drops)[:10]
    if picked:
        lines += [
            "",
            "| id | category | question | reference | champion | candidate |",
            "|---|---|---|---|---|---|",
        ]
    for i in picked:
        r = rows[i]
        lines.append(
            f"| {r['id']} | {r['category']} | {_md_escape(r['question'], 80)} | {_md_escape(r['answer'], 80)} | "
            f"{_md_escape(champ[i]['prediction'], 80)} | {_md_escape(cand[i]['prediction'], 80)} |"
        )
    return lines


def _samples_section(ev: Evaluation, models: Sequence[str]) -> Lines:
    lines = ["", "## Sample generations", ""]
    for i, r in enumerate(ev.rows[:5]):
        lines += [
            f"**{_md_escape(r['question'], 200)}** (`{r['category']}`)",
            "",
            f"- reference: {_md_escape(r['answer'], 300)}",
        ]
        for m in models:
            res = ev.results[m]
            assert res is not None
            p = res[i]
            eos_note = "" if p["ended_with_eos"] else ", no EOS"
            answer = _md_escape(p["prediction"], 300) or "(empty)"
            lines.append(f"- {m}: {answer} (F1 {p['token_f1']:.2f}{eos_note})")
        lines.append("")
    return lines
