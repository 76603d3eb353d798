"""Serving cost in the gate: the candidate's ONNX export measured as served, beside the champion's.

The evaluate stage's gate judges answers; this part judges what serving them costs, which only exists
once the export does. Both models are measured on this machine in fresh processes, taking turns
(candidate, champion, candidate, ...), so the comparison is fair whatever else the machine is doing;
each side keeps its best repeat (interference only ever slows a run down). Two rules, printed like the
gate's:

* `max_latency_regression`: how much slower the candidate generates per token at batch 1 than the
  champion (champion tokens/s / candidate tokens/s - 1); per token, so that a candidate is not blamed
  for answering at more length;
* `max_size_regression`: how much larger the export is on disk (candidate / champion - 1).

Without a champion both pass and say so. A failed rule refuses the candidate (GateFailed): nothing is
exported, registered or promoted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.core.layout import GateFailed
from tasks.plumbing.serving.cost import measure_in_fresh_process

log = logging.getLogger("qa_lora.export")

# The figures each side keeps from its best repeat, and which way is better.
HIGHER_IS_BETTER = ("tokens_per_s_b1", "tokens_per_s_b8")
LOWER_IS_BETTER = ("latency_p50_ms", "latency_p95_ms", "peak_rss_bytes", "load_s")


def measure_serving(
    cfg: Config,
    onnx_dir: Path,
    champion: Mapping[str, Any] | None,
    questions: Sequence[str],
    provider: str,
) -> dict[str, Any]:
    """Candidate (and champion) figures, side by side, and the serving rules' verdict.

    Returns:
        {"candidate", "champion" (figures + "version", or None), "rules", "passed", "repeats",
        "questions", "max_new_tokens"}.
    """
    repeats, new_tokens = cfg.export.serving_repeats, cfg.eval.max_new_tokens
    sides = {"candidate": onnx_dir}
    if champion is not None:
        sides["champion"] = Path(champion["onnx_path"])
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for repeat in range(repeats):
        for side, path in sides.items():
            runs[side].append(measure_in_fresh_process(path, questions, new_tokens, provider))
            log.info(
                "export: serving cost %s, repeat %d/%d: %s", side, repeat + 1, repeats, _brief(runs[side][-1])
            )
    candidate = best_of(runs["candidate"])
    champ = {**best_of(runs["champion"]), "version": str(champion["version"])} if champion else None
    rules = serving_rules(candidate, champ, cfg.gate.max_latency_regression, cfg.gate.max_size_regression)
    return {
        "candidate": candidate,
        "champion": champ,
        "rules": rules,
        "passed": all(r["passed"] for r in rules),
        "repeats": repeats,
        "questions": len(questions),
        "max_new_tokens": new_tokens,
    }


def best_of(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each figure's best value over the repeats (the least disturbed one); the rest from the first."""
    best = dict(runs[0])
    for key in HIGHER_IS_BETTER:
        best[key] = max(r[key] for r in runs)
    for key in LOWER_IS_BETTER:
        best[key] = min(r[key] for r in runs)
    return best


def serving_rules(
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    max_latency_regression: float,
    max_size_regression: float,
) -> list[dict[str, Any]]:
    """The two rules (gate.json's rule shape: name, passed, value, threshold, detail)."""
    if champion is None:
        detail = "no champion registered yet: nothing to compare the serving cost with"
        return [
            _rule(name, True, None, None, detail)
            for name in ("max_latency_regression", "max_size_regression")
        ]
    version = champion.get("version", "?")
    slower = champion["tokens_per_s_b1"] / candidate["tokens_per_s_b1"] - 1
    larger = candidate["size_bytes"] / champion["size_bytes"] - 1
    return [
        _rule(
            "max_latency_regression",
            slower <= max_latency_regression,
            slower,
            max_latency_regression,
            f"candidate {candidate['tokens_per_s_b1']:.0f} vs champion v{version} "
            f"{champion['tokens_per_s_b1']:.0f} tokens/s at batch 1 "
            f"({_pct(candidate['tokens_per_s_b1'] / champion['tokens_per_s_b1'] - 1)}; "
            f"p95 {candidate['latency_p95_ms']:.0f} vs {champion['latency_p95_ms']:.0f} ms per request); "
            f"the champion may be at most {max_latency_regression:.0%} faster per token",
        ),
        _rule(
            "max_size_regression",
            larger <= max_size_regression,
            larger,
            max_size_regression,
            f"candidate {candidate['size_bytes'] / 2**20:.1f} MiB vs champion v{version} "
            f"{champion['size_bytes'] / 2**20:.1f} MiB on disk ({_pct(larger)}); "
            f"at most {max_size_regression:.0%} larger",
        ),
    ]


def raise_if_refused(serving: Mapping[str, Any]) -> None:
    """Log every rule like the gate task does; refuse the candidate when one failed.

    Raises:
        GateFailed: naming each failed rule and its detail.
    """
    for rule in serving["rules"]:
        log.info(
            "serving rule %-24s %s value=%s threshold=%s %s",
            rule["name"],
            "PASS" if rule["passed"] else "FAIL",
            rule["value"],
            rule["threshold"],
            rule["detail"],
        )
    failed = [f"{r['name']}: {r['detail']}" for r in serving["rules"] if not r["passed"]]
    if failed:
        raise GateFailed(f"serving gate failed: {'; '.join(failed)}. Nothing exported or registered.")


def _rule(
    name: str, passed: bool, value: float | None, threshold: float | None, detail: str
) -> dict[str, Any]:
    return {
        "name": name,
        "passed": bool(passed),
        "value": None if value is None else round(value, 4),
        "threshold": threshold,
        "detail": detail,
    }


def _pct(change: float) -> str:
    return f"{change:+.0%}"


def _brief(f: Mapping[str, Any]) -> str:
    return (
        f"{f['tokens_per_s_b1']:.0f} tok/s b1, {f['tokens_per_s_b8']:.0f} tok/s b8, p50 {f['latency_p50_ms']:.0f} ms, "
        f"p95 {f['latency_p95_ms']:.0f} ms, {f['size_bytes'] / 2**20:.1f} MiB, RSS {f['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
