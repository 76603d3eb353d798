"""The serving rules of the export (stages/export/serving_gate.py), with measured figures injected."""

from __future__ import annotations

import pytest

from tasks.core.layout import GateFailed
from tasks.stages.export.serving_gate import best_of, raise_if_refused, serving_rules

MiB = 2**20


def _figures(tps: float, size_mib: float, p95: float = 100.0) -> dict[str, float]:
    return {
        "tokens_per_s_b1": tps,
        "tokens_per_s_b8": 3 * tps,
        "latency_p50_ms": p95 / 2,
        "latency_p95_ms": p95,
        "size_bytes": size_mib * MiB,
        "peak_rss_bytes": 200 * MiB,
        "load_s": 0.4,
    }


def _by_name(rules: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rules}


def test_without_a_champion_both_rules_pass_and_say_why() -> None:
    rules = _by_name(serving_rules(_figures(10, 5), None, 0.0, 0.0))
    assert set(rules) == {"max_latency_regression", "max_size_regression"}
    assert all(r["passed"] and r["value"] is None and "no champion" in r["detail"] for r in rules.values())


def test_slower_per_token_than_the_margin_fails_by_name() -> None:
    champion = {**_figures(1000, 10), "version": "3"}
    rules = _by_name(serving_rules(_figures(600, 10), champion, 0.5, 0.1))
    slow = rules["max_latency_regression"]
    assert not slow["passed"] and slow["value"] == pytest.approx(1000 / 600 - 1, abs=1e-4)
    assert "600 vs champion v3 1000 tokens/s" in slow["detail"] and "-40%" in slow["detail"]
    assert rules["max_size_regression"]["passed"] and rules["max_size_regression"]["value"] == 0.0
    # within the margin (and faster) passes
    assert _by_name(serving_rules(_figures(700, 10), champion, 0.5, 0.1))["max_latency_regression"]["passed"]
    assert _by_name(serving_rules(_figures(2000, 10), champion, 0.0, 0.1))["max_latency_regression"]["passed"]


def test_larger_than_the_margin_fails_by_name() -> None:
    champion = {**_figures(1000, 10), "version": "7"}
    rules = _by_name(serving_rules(_figures(1000, 12.5), champion, 0.5, 0.1))
    big = rules["max_size_regression"]
    assert not big["passed"] and big["value"] == pytest.approx(0.25)
    assert "12.5 MiB vs champion v7 10.0 MiB" in big["detail"] and "+25%" in big["detail"]
    assert _by_name(serving_rules(_figures(1000, 10.9), champion, 0.5, 0.1))["max_size_regression"]["passed"]


def test_a_failed_rule_refuses_with_every_failed_reason() -> None:
    champion = {**_figures(1000, 10), "version": "2"}
    rules = serving_rules(_figures(400, 20), champion, 0.5, 0.1)
    with pytest.raises(
        GateFailed, match=r"serving gate failed: max_latency_regression: .*; max_size_regression: "
    ):
        raise_if_refused({"rules": rules})
    raise_if_refused({"rules": serving_rules(_figures(1000, 10), champion, 0.5, 0.1)})  # passes: no error


def test_best_of_keeps_each_figures_best_repeat() -> None:
    slow, fast = _figures(500, 10, p95=300), _figures(900, 10, p95=120)
    slow["peak_rss_bytes"], fast["peak_rss_bytes"] = 100 * MiB, 150 * MiB
    best = best_of([slow, fast])
    assert best["tokens_per_s_b1"] == 900 and best["latency_p95_ms"] == 120
    assert best["peak_rss_bytes"] == 100 * MiB and best["size_bytes"] == 10 * MiB
