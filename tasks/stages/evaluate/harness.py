"""The harness rule: the candidate keeps the base's scores on the standard tasks (lm-evaluation-harness).

Per task in `eval.harness_tasks` (tasks/plumbing/harness.py runs them), the candidate's headline metric
(acc_norm, acc, exact_match, ...) may fall at most `gate.max_harness_regression` (absolute, in the
metric's own units) below the base's; the rule's value is the largest drop over the tasks. A task with
no higher-is-better figure for both models fails the rule, naming it. The harness's standard errors
are shown beside each figure. `gate.max_harness_regression: null` reports the tasks without gating.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RULE = "max_harness_regression"


def harness_rule(
    candidate: Mapping[str, Mapping[str, Any]],
    base: Mapping[str, Mapping[str, Any]],
    max_regression: float | None,
) -> dict[str, Any]:
    """The gate rule from the base's and the candidate's per-task results (plumbing.harness_scores)."""
    tasks: dict[str, dict[str, Any]] = {}
    missing = []
    for name in sorted({*base, *candidate}):
        ref, cand = base.get(name) or {}, candidate.get(name) or {}
        if ref.get("value") is None or cand.get("value") is None:
            missing.append(name)  # asked for, and no figure to compare: never a silent pass
            continue
        tasks[name] = {
            "metric": ref["metric"],
            "base": ref["value"],
            "candidate": cand["value"],
            "change": round(cand["value"] - ref["value"], 9),  # 0.4 - 0.3 is 0.1, not 0.10000000000000003
            "base_stderr": ref.get("stderr"),
            "candidate_stderr": cand.get("stderr"),
        }
    # the rule's value is the largest drop (base - candidate) over the tasks: negative when all improved
    value = max((-t["change"] for t in tasks.values()), default=None)
    gating = max_regression is not None
    passed = not gating or (not missing and value is not None and value <= max_regression)
    return {
        "name": RULE,
        "passed": passed,
        "value": value,
        "threshold": max_regression,
        "detail": _detail(tasks, missing, max_regression),
        "tasks": tasks,
        "missing": missing,
    }


def _detail(tasks: Mapping[str, Mapping[str, Any]], missing: list[str], max_regression: float | None) -> str:
    parts = [
        f"{name} {t['metric']}: candidate {t['candidate']:.3f}{_se(t['candidate_stderr'])} vs base "
        f"{t['base']:.3f}{_se(t['base_stderr'])} ({t['change']:+.3f})"
        for name, t in sorted(tasks.items())
    ]
    if missing:
        parts.append(f"no higher-is-better metric for both models from {', '.join(missing)}")
    limit = (
        f"a drop of at most {max_regression:.3f} allowed per task"
        if max_regression is not None
        else "reported, not gated (gate.max_harness_regression: null)"
    )
    return "; ".join(parts) + f"; {limit}"


def _se(stderr: Any) -> str:
    return f" ±{stderr:.3f}" if isinstance(stderr, int | float) else ""
