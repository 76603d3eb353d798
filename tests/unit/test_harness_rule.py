"""The harness rule's arithmetic, the local multiple-choice task's documents, the settings' checks
(the harness on real models: tests/model/test_harness.py and tests/model/test_evaluate.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tasks.core.config import load_config
from tasks.core.errors import UserError
from tasks.plumbing.harness import DISTRACTORS, harness_settings, local_task_docs
from tasks.stages.evaluate.harness import harness_rule


def _task(value: float, stderr: float | None = 0.03, metric: str = "acc_norm") -> dict[str, object]:
    return {"metric": metric, "value": value, "stderr": stderr, "metrics": {metric: value}}


def test_the_rule_gates_on_the_largest_drop_over_the_tasks() -> None:
    base = {"qa_lora_mc": _task(0.40), "arc_easy": _task(0.60, metric="acc")}
    better = {"qa_lora_mc": _task(0.55), "arc_easy": _task(0.59, metric="acc")}
    rule = harness_rule(better, base, max_regression=0.05)
    assert rule["name"] == "max_harness_regression" and rule["passed"]
    assert rule["value"] == pytest.approx(0.01)  # arc_easy fell 0.01, the largest drop
    assert rule["tasks"]["qa_lora_mc"]["change"] == pytest.approx(0.15)
    assert "arc_easy acc: candidate 0.590 ±0.030 vs base 0.600 ±0.030 (-0.010)" in rule["detail"]

    worse = {"qa_lora_mc": _task(0.30), "arc_easy": _task(0.61, metric="acc")}
    failed = harness_rule(worse, base, max_regression=0.05)
    assert not failed["passed"] and failed["value"] == pytest.approx(0.10)
    assert harness_rule(worse, base, max_regression=0.10)["passed"]  # the threshold itself passes

    reported = harness_rule(worse, base, max_regression=None)
    assert reported["passed"] and "not gated" in reported["detail"]


def test_no_result_for_both_models_fails_rather_than_passing_silently() -> None:
    rule = harness_rule({"qa_lora_mc": _task(0.5)}, {"arc_easy": _task(0.5)}, max_regression=0.05)
    assert not rule["passed"] and rule["missing"] == ["arc_easy", "qa_lora_mc"]
    assert "no higher-is-better metric for both models from arc_easy, qa_lora_mc" in rule["detail"]
    # a task asked for that gave no figure fails the rule even when the others are fine
    base = {"qa_lora_mc": _task(0.4), "mmlu": {"metric": None, "value": None, "stderr": None, "metrics": {}}}
    partial = harness_rule({"qa_lora_mc": _task(0.5), "mmlu": base["mmlu"]}, base, max_regression=0.05)
    assert (
        not partial["passed"] and partial["missing"] == ["mmlu"] and partial["value"] == pytest.approx(-0.1)
    )


def test_the_local_task_asks_each_question_with_its_answer_among_other_answers() -> None:
    rows = [
        {"id": f"{i:04x}", "question": f"What does f{i}() do?", "answer": f"It does thing {i % 7}."}
        for i in range(30)
    ]
    docs = local_task_docs(rows)
    assert docs == local_task_docs(rows)  # the same rows, the same task
    assert [d["question"] for d in docs] == [r["question"] for r in rows]
    for doc, row in zip(docs, rows, strict=True):
        assert doc["choices"][doc["label"]] == row["answer"]
        assert len(doc["choices"]) == DISTRACTORS + 1 == len(set(doc["choices"]))
    assert len({d["label"] for d in docs}) > 1  # the right answer is not always in one place


def test_settings_refuse_a_missing_extra_or_yaml_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert harness_settings(load_config(overrides=[("eval.harness_tasks", [])])) is None
    with pytest.raises(UserError, match=r"eval.harness_tasks: .*missing.yaml: no such task YAML"):
        harness_settings(load_config(overrides=[("eval.harness_tasks", [str(tmp_path / "missing.yaml")])]))
    own = tmp_path / "mine.yaml"
    own.write_text("task: mine\n")
    settings = harness_settings(load_config(overrides=[("eval.harness_tasks", ["qa_lora_mc", str(own)])]))
    assert (
        settings is not None
        and settings["tasks"] == ["qa_lora_mc", str(own)]
        and str(own) in settings["yamls"]
    )

    # The extra is not installed: what the code decides is tested with the package hidden.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a))
    with pytest.raises(UserError) as err:
        harness_settings(load_config())
    assert "lm-evaluation-harness is not installed" in str(err.value) and "[harness]" in str(err.value)
    assert "eval.harness_tasks: []" in str(err.value) and "\n" not in str(err.value)
