"""Answer metrics, the paired bootstrap and the gate rules, on hand-made per-row scores (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.stages.evaluate.metrics import (
    aggregate,
    answer_diversity,
    bootstrap_ci,
    decide_gate,
    exact_match,
    normalize_answer,
    rouge_l,
    token_f1,
)

GATE = dict(
    primary_metric="token_f1",
    primary_metrics=("token_f1", "rouge_l"),
    min_improvement=0.0,
    max_regression=0.02,
    min_slice_size=20,
    min_eos_rate=0.5,
    max_empty_rate=0.1,
    samples=500,
    confidence=0.95,
    seed=0,
)


def _rows(scores: list[float], categories: list[str], eos: float = 1.0, empty: float = 0.0) -> list[dict]:
    n = len(scores)
    return [
        {
            "id": f"r{i}",
            "category": categories[i],
            "exact_match": float(s >= 0.99),
            "token_f1": s,
            "rouge_l": s,
            "ended_with_eos": i < round(eos * n),
            "empty": i < round(empty * n),
        }
        for i, s in enumerate(scores)
    ]


def _rule(gate: dict, name: str) -> dict:
    return next(r for r in gate["rules"] if r["name"] == name)


# --- per-row metrics --------------------------------------------------------------------------------


def test_normalization_and_exact_match_follow_squad() -> None:
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert exact_match("the answer.", "Answer") == 1.0
    assert exact_match("answers", "answer") == 0.0


def test_token_f1_partial_overlap_and_empty_cases() -> None:
    # pred {register, virtual, subclass} vs ref {register, virtual, subclass, of, abc}: P=1, R=3/5
    assert token_f1("Register virtual subclass", "Register a virtual subclass of an ABC.") == pytest.approx(
        0.75
    )
    assert token_f1("", "") == 1.0
    assert token_f1("", "something") == 0.0
    assert token_f1("nothing shared", "entirely different") == 0.0


def test_rouge_l_orders_by_subsequence_overlap() -> None:
    ref = "Return the number of items in a container."
    assert rouge_l(ref, ref) == pytest.approx(1.0)
    assert 0.0 < rouge_l("the number of items", ref) < 1.0
    assert rouge_l("", ref) == 0.0


def test_aggregate_weights_loss_by_tokens_and_counts_rates() -> None:
    rows = [
        {"token_f1": 1.0, "nll_sum": 2.0, "n_answer_tokens": 1, "ended_with_eos": True, "empty": False},
        {"token_f1": 0.0, "nll_sum": 2.0, "n_answer_tokens": 3, "ended_with_eos": False, "empty": True},
    ]
    agg = aggregate(rows)
    assert agg["token_f1"] == pytest.approx(0.5)
    assert agg["loss"] == pytest.approx(1.0)  # 4 nats over 4 tokens, not the mean of per-row means
    assert agg["perplexity"] == pytest.approx(np.e)
    assert agg["eos_rate"] == pytest.approx(0.5) and agg["empty_rate"] == pytest.approx(0.5)


# --- bootstrap ----------------------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_reproducible() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random(200), rng.random(200)
    first = bootstrap_ci(a, 1000, 0.95, seed=7, reference=b)
    assert bootstrap_ci(a, 1000, 0.95, seed=7, reference=b) == first
    assert bootstrap_ci(a, 1000, 0.95, seed=8, reference=b) != first
    assert first["low"] <= first["mean"] <= first["high"]


def test_paired_bootstrap_is_tighter_than_the_spread_of_scores() -> None:
    rng = np.random.default_rng(0)
    difficulty = rng.random(200)  # shared per-question difficulty cancels in a paired comparison
    base = difficulty
    cand = difficulty + 0.05 + rng.normal(0, 0.01, 200)
    ci = bootstrap_ci(cand, 1000, 0.95, 0, reference=base)
    assert ci["low"] > 0.04 and ci["high"] < 0.06
    wider = bootstrap_ci(cand, 1000, 0.99, 0, reference=base)
    assert wider["low"] <= ci["low"] and wider["high"] >= ci["high"]


def test_bootstrap_of_identical_models_is_exactly_zero() -> None:
    x = np.linspace(0, 1, 50)
    assert bootstrap_ci(x, 200, 0.95, 0, reference=x) == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 50}


# --- gate ---------------------------------------------------------------------------------------------


def test_clear_improvement_without_champion_passes() -> None:
    cats = ["a"] * 30 + ["b"] * 30
    base = _rows([0.1] * 60, cats)
    cand = _rows([0.5 + 0.01 * (i % 5) for i in range(60)], cats)
    gate = decide_gate(cand, base, None, **GATE)
    assert gate["passed"] and gate["decision"] == "pass" and gate["reasons"] == []
    beats = _rule(gate, "beats_base:token_f1")
    assert beats["value"] > 0.3 and beats["threshold"] == 0.0
    assert _rule(gate, "no_regression:champion")["value"] is None


def test_no_improvement_fails_naming_the_metric() -> None:
    cats = ["a"] * 60
    scores = [0.2 + 0.1 * (i % 3) for i in range(60)]
    gate = decide_gate(_rows(scores, cats), _rows(scores, cats), None, **GATE)
    assert not gate["passed"] and gate["decision"] == "fail"
    assert any("beats_base:token_f1" in r for r in gate["reasons"])


def test_sanity_floors_fail_on_missing_eos_and_empty_answers() -> None:
    cats = ["a"] * 40
    base = _rows([0.0] * 40, cats)
    cand = _rows([0.8] * 40, cats, eos=0.2, empty=0.3)
    gate = decide_gate(cand, base, None, **GATE)
    failed = {r["name"] for r in gate["rules"] if not r["passed"]}
    assert failed == {"min_eos_rate", "max_empty_rate"}
    assert _rule(gate, "min_eos_rate")["value"] == pytest.approx(0.2)
    assert _rule(gate, "max_empty_rate")["value"] == pytest.approx(0.3)


def test_regression_on_one_gated_slice_fails_although_the_average_is_higher() -> None:
    cats = ["big"] * 60 + ["small_ok"] * 30 + ["tiny"] * 5
    base = _rows([0.1] * 95, cats)
    champion = _rows([0.5] * 60 + [0.6] * 30 + [0.9] * 5, cats)
    # Much better on "big", 0.10 worse on "small_ok" (30 rows, gated), much worse on "tiny" (5 rows).
    cand = _rows([0.8] * 60 + [0.5] * 30 + [0.0] * 5, cats)
    gate = decide_gate(cand, base, champion, champion_version="3", **GATE)
    assert aggregate(cand)["token_f1"] > aggregate(champion)["token_f1"]
    assert not gate["passed"]
    failed = {r["name"] for r in gate["rules"] if not r["passed"]}
    assert failed == {"no_regression:token_f1[small_ok]", "no_regression:rouge_l[small_ok]"}
    rule = _rule(gate, "no_regression:token_f1[small_ok]")
    assert rule["value"] == pytest.approx(-0.1) and rule["threshold"] == pytest.approx(-0.02)
    # Slices under min_slice_size are reported but never gate.
    assert not any("[tiny]" in r["name"] for r in gate["rules"])
    assert gate["champion_version"] == "3"
    assert any("small_ok" in reason and "token_f1" in reason for reason in gate["reasons"])


def test_overall_regression_beyond_tolerance_fails_within_tolerance_passes() -> None:
    cats = ["a"] * 50
    base = _rows([0.0] * 50, cats)
    champion = _rows([0.6] * 50, cats)
    small_drop = decide_gate(_rows([0.59] * 50, cats), base, champion, **GATE)
    assert small_drop["passed"]
    big_drop = decide_gate(_rows([0.5] * 50, cats), base, champion, **GATE)
    assert "no_regression:token_f1" in {r["name"] for r in big_drop["rules"] if not r["passed"]}


def test_noninferiority_test_uses_the_ci_lower_bound() -> None:
    rng = np.random.default_rng(3)
    cats = ["a"] * 40
    champ_scores = rng.random(40)
    cand_scores = np.clip(champ_scores + rng.normal(0, 0.3, 40), 0, 1)  # same on average, noisy
    base = _rows([0.0] * 40, cats)
    args = dict(GATE, min_slice_size=100)
    mean_test = decide_gate(_rows(list(cand_scores), cats), base, _rows(list(champ_scores), cats), **args)
    strict = decide_gate(
        _rows(list(cand_scores), cats),
        base,
        _rows(list(champ_scores), cats),
        **dict(args, regression_test="noninferiority"),
    )
    m, s = _rule(mean_test, "no_regression:token_f1"), _rule(strict, "no_regression:token_f1")
    assert s["value"] < m["value"]  # the lower bound is below the mean difference
    assert not s["passed"]  # 40 noisy rows cannot show non-inferiority within 0.02


def test_gate_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(5)
    cats = ["a"] * 40 + ["b"] * 40
    base, cand = _rows(list(rng.random(80)), cats), _rows(list(rng.random(80)), cats)
    assert decide_gate(cand, base, None, **GATE) == decide_gate(cand, base, None, **GATE)


def test_diversity_counts_normalized_answers() -> None:
    div = answer_diversity(["A file.", "a file", "The file!", "Return it.", "x"])
    # "A file." / "a file" / "The file!" normalize to "file"; 3 distinct answers of 5
    assert div == {"distinct_answer_share": 0.6, "top_answer_share": 0.6, "top_answer": "file"}
    agg = aggregate([{"prediction": p} for p in ("yes", "no", "no", "no")])
    assert agg["distinct_answer_share"] == 0.5 and agg["top_answer_share"] == 0.75


def test_a_collapsed_candidate_fails_the_top_answer_floor_even_when_it_beats_base() -> None:
    cats = ["a"] * 40
    base = _rows([0.0] * 40, cats)
    collapsed = [
        {**r, "prediction": "Return the current file." if i % 4 else f"answer {i}"}
        for i, r in enumerate(_rows([0.6] * 40, cats))
    ]
    gate = decide_gate(collapsed, base, None, **{**GATE, "max_top_answer_share": 0.5})
    failed = {r["name"] for r in gate["rules"] if not r["passed"]}
    assert failed == {"max_top_answer_share"}
    rule = _rule(gate, "max_top_answer_share")
    assert rule["value"] == pytest.approx(0.75) and "return current file" in rule["detail"]
    varied = [{**r, "prediction": f"answer {i}"} for i, r in enumerate(collapsed)]
    assert decide_gate(varied, base, None, **{**GATE, "max_top_answer_share": 0.5})["passed"]
