"""The evaluate stage on the tiny base: real adapters, real generation, the gate's decisions on disk.

The champion comes from a real (empty) MLflow registry here; the champion rule against a registered
champion is tested in test_gate_champion.py.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
from small_lora import small_lora_overrides

from tasks.core.config import Config, load_config
from tasks.core.errors import UserError
from tasks.stages.evaluate import evaluate_against, evaluate_candidate

# Two categories whose answers follow a fixed pattern: a few dozen LoRA steps learn them, the
# pretrained-only base cannot produce them.
FUNCS = [
    f"{verb}_{noun}"
    for verb in ("get", "load", "parse", "make", "read", "find")
    for noun in ("item", "path", "name", "value", "entry", "token", "field", "block")
]
ANSWERS = {
    "returns": "A new list.",
    "raises": "ValueError on bad input.",
}
QUESTIONS = {
    "returns": ["What does {f}() return?", "What is the return value of {f}()?"],
    "raises": ["When does {f}() raise an exception?", "Which error can {f}() raise?"],
}


def _dataset() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = []
    for cat, templates in QUESTIONS.items():
        for f in FUNCS:
            for t in templates:
                q = t.format(f=f)
                rows.append(
                    {
                        "id": hashlib.sha256(q.encode()).hexdigest()[:12],
                        "question": q,
                        "answer": ANSWERS[cat],
                        "category": cat,
                    }
                )
    random.Random(0).shuffle(rows)
    eval_rows = [r for r in rows if int(r["id"], 16) % 4 == 0]
    train_rows = [r for r in rows if int(r["id"], 16) % 4 != 0]
    return train_rows, eval_rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _train(tmp: Path, base: Path, name: str, train_rows: list, eval_rows: list, **train: Any) -> Path:
    """A LoRA adapter trained by the real train stage (TRL SFTTrainer) on a tiny budget."""
    from tasks.stages.train import train_adapter

    run_dir = tmp / name
    _write_jsonl(run_dir / "data" / "train.jsonl", train_rows)
    _write_jsonl(run_dir / "data" / "eval.jsonl", eval_rows)
    settings = {
        "max_steps": 60,
        "per_device_train_batch_size": 16,
        "learning_rate": 5e-3,
        "save_steps": 1000,
        **train,
    }
    cfg = load_config(
        overrides=[
            *small_lora_overrides(),
            ("base.name_or_path", str(base)),
            ("register.tracking_uri", f"sqlite:///{tmp / 'mlflow.db'}"),
            ("runtime.device", "cpu"),
            *((f"train.{k}", v) for k, v in settings.items()),
        ]
    )
    result = train_adapter(cfg, run_dir)
    adapter = run_dir / "train" / "adapter"
    assert (adapter / "adapter_config.json").is_file(), result
    return adapter


def _cfg(tmp: Path, adapters: dict[str, Any], **extra: Any) -> Config:
    """Evaluation settings for one test; the champion comes from the module's (empty) registry."""
    overrides = {
        "base.name_or_path": str(adapters["base"]),
        "eval.cache_dir": str(tmp / "cache"),
        "eval.max_new_tokens": 20,
        "eval.batch_size": 16,
        "eval.bootstrap_samples": 300,
        "register.tracking_uri": adapters["registry"],
        "runtime.device": "cpu",
        # one reference answer per category by design: a model that learnt it repeats it, so the
        # top-answer floor (for real data; unit-tested in tests/unit/test_metrics.py) is off here
        "gate.max_top_answer_share": 1.0,
        "gate.max_general_ppl_increase": None,  # tests/small_lora.py; the forgetting test turns it on
        **extra,
    }
    return load_config(overrides=list(overrides.items()))


def _run_dir(tmp: Path, name: str, eval_rows: list[dict[str, str]], adapter: Path) -> Path:
    run_dir = tmp / name
    _write_jsonl(run_dir / "data" / "eval.jsonl", eval_rows)
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "train" / "adapter").symlink_to(adapter, target_is_directory=True)
    return run_dir


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("adapters")
    train_rows, eval_rows = _dataset()
    good = _train(tmp, tiny_base, "good", train_rows, eval_rows)
    # Sabotage: a learning rate of ~0 leaves the adapter's B matrices at their zero init.
    untrained = _train(tmp, tiny_base, "untrained", train_rows, eval_rows, max_steps=2, learning_rate=1e-12)
    # Sabotage for the harness rule: each category taught the other's answer, so the multiple-choice task
    # built from the eval questions (their answer among the others) now picks the wrong one.
    swap = {a: b for a, b in zip(ANSWERS.values(), reversed(ANSWERS.values()), strict=True)}
    swapped_rows = [{**r, "answer": swap[r["answer"]]} for r in train_rows]
    swapped = _train(tmp, tiny_base, "swapped", swapped_rows, eval_rows)
    return {
        "base": tiny_base,
        "registry": f"sqlite:///{tmp / 'mlflow.db'}",  # no model registered: no champion
        "eval_rows": eval_rows,
        "good": good,
        "untrained": untrained,
        "swapped": swapped,
    }


@pytest.mark.slow
def test_good_candidate_passes_and_writes_every_artifact(adapters: dict[str, Any], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, adapters)
    run_dir = _run_dir(tmp_path, "run", adapters["eval_rows"], adapters["good"])
    result = evaluate_candidate(cfg, run_dir)

    assert result["passed"] and result["decision"] == "pass", result["reasons"]
    assert result["candidate"]["token_f1"] > result["base"]["token_f1"]
    assert result["champion"] is None and result["champion_version"] is None
    eval_dir = run_dir / "eval"
    gate = json.loads((eval_dir / "gate.json").read_text())
    assert set(gate) >= {
        "passed",
        "decision",
        "primary_metric",
        "rules",
        "reasons",
        "champion_version",
        "metrics",
    }
    beats = next(r for r in gate["rules"] if r["name"] == "beats_base:token_f1")
    assert beats["passed"] and beats["value"] > beats["threshold"]
    assert gate["metrics"]["champion"] is None
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert {"base", "candidate", "candidate_minus_base"} <= set(metrics)
    assert metrics["candidate"]["loss"] < metrics["base"]["loss"]
    assert metrics["candidate"]["eos_rate"] >= cfg.gate.min_eos_rate
    assert (eval_dir / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (eval_dir / "eval_report.md").read_text()
    for section in (
        "Gate: PASSED",
        "## Models",
        "## Paired bootstrap",
        "## Slices by category",
        "## Sample generations",
    ):
        assert section in report
    # lm-evaluation-harness (eval.harness_tasks' default, qa_lora_mc): the candidate picks its answers
    harness = next(r for r in gate["rules"] if r["name"] == "max_harness_regression")
    mc = harness["tasks"]["qa_lora_mc"]
    assert harness["passed"] and mc["candidate"] > mc["base"] and harness["value"] == -mc["change"]
    assert metrics["harness"]["qa_lora_mc"]["candidate"] == pytest.approx(mc["candidate"])
    assert "## lm-evaluation-harness tasks" in report and "| qa_lora_mc | acc_norm |" in report
    preds = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(adapters["eval_rows"]) and {"base", "candidate"} <= set(preds[0])
    assert (eval_dir / "plots" / "models.csv").read_text().startswith("model,")
    assert not list(run_dir.glob("eval*/.tmp-*")) and not list(run_dir.glob(".tmp-*"))

    # Second run: every model comes from the cache, and the decision and numbers are identical
    # (the bootstrap is seeded).
    again = evaluate_candidate(cfg, run_dir)
    assert again["cache"] == {"base": "hit", "candidate": "hit"}
    assert json.loads((eval_dir / "gate.json").read_text()) == gate
    # Naming no champion explicitly (what a benchmark without a registry does) decides the same.
    explicit = evaluate_against(cfg, run_dir, champion=None)
    assert explicit["cache"] == again["cache"] and explicit["reasons"] == again["reasons"]
    assert json.loads((eval_dir / "gate.json").read_text()) == gate


@pytest.mark.slow
def test_untrained_adapter_fails_naming_the_metric(adapters: dict[str, Any], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, adapters)
    run_dir = _run_dir(tmp_path, "run", adapters["eval_rows"], adapters["untrained"])
    result = evaluate_candidate(cfg, run_dir)
    assert not result["passed"] and result["decision"] == "fail"
    assert any(r.startswith("beats_base:token_f1") for r in result["reasons"])
    gate = json.loads((run_dir / "eval" / "gate.json").read_text())
    assert gate["passed"] is False and gate["reasons"] == result["reasons"]
    assert "Gate: FAILED" in (run_dir / "eval" / "eval_report.md").read_text()


@pytest.mark.slow
def test_a_candidate_that_forgets_fails_the_forgetting_rule_while_beating_the_base(
    adapters: dict[str, Any], tmp_path: Path
) -> None:
    """The good adapter learnt its narrow task at a high learning rate: it beats the base on the Q&A
    metric and loses the base's general language (its perplexity on held-out text more than doubles).
    The untrained one changes nothing: the rule reads zero for it."""
    cfg = _cfg(tmp_path, adapters, **{"gate.max_general_ppl_increase": 0.25})
    run_dir = _run_dir(tmp_path, "forgets", adapters["eval_rows"], adapters["good"])
    result = evaluate_candidate(cfg, run_dir)
    assert not result["passed"] and [r.split(":")[0] for r in result["reasons"]] == [
        "max_general_ppl_increase"
    ], result["reasons"]
    gate = json.loads((run_dir / "eval" / "gate.json").read_text())
    rules = {r["name"]: r for r in gate["rules"]}
    assert rules["beats_base:token_f1"]["passed"]
    forgetting = rules["max_general_ppl_increase"]
    assert forgetting["ci"]["low"] > 0.25 and forgetting["value"] > 0.25
    assert forgetting["perplexity"]["candidate"] > 1.25 * forgetting["perplexity"]["base"]
    report = (run_dir / "eval" / "eval_report.md").read_text()
    assert "held-out general documents" in report and "general language ability" in report
    untouched = _run_dir(tmp_path, "untouched", adapters["eval_rows"], adapters["untrained"])
    evaluate_candidate(cfg, untouched)
    rules = {r["name"]: r for r in json.loads((untouched / "eval" / "gate.json").read_text())["rules"]}
    assert rules["max_general_ppl_increase"]["passed"]
    assert abs(rules["max_general_ppl_increase"]["value"]) < 0.01


@pytest.mark.slow
def test_a_candidate_that_loses_a_harness_skill_fails_the_harness_rule(
    adapters: dict[str, Any], tmp_path: Path
) -> None:
    """Taught the wrong answers, the candidate now prefers them in the multiple-choice task the harness
    runs: its accuracy falls below the base's by more than gate.max_harness_regression. The untrained
    adapter is the base's own model: the rule reads exactly zero."""
    cfg = _cfg(tmp_path, adapters)
    run_dir = _run_dir(tmp_path, "swapped", adapters["eval_rows"], adapters["swapped"])
    result = evaluate_candidate(cfg, run_dir)
    assert not result["passed"] and any(r.startswith("max_harness_regression") for r in result["reasons"])
    rule = next(
        r
        for r in json.loads((run_dir / "eval" / "gate.json").read_text())["rules"]
        if r["name"] == "max_harness_regression"
    )
    mc = rule["tasks"]["qa_lora_mc"]
    assert mc["base"] - mc["candidate"] > cfg.gate.max_harness_regression == rule["threshold"]
    assert f"qa_lora_mc acc_norm: candidate {mc['candidate']:.3f}" in rule["detail"]
    untouched = _run_dir(tmp_path, "untouched", adapters["eval_rows"], adapters["untrained"])
    evaluate_candidate(cfg, untouched)
    gate = json.loads((untouched / "eval" / "gate.json").read_text())
    same = next(r for r in gate["rules"] if r["name"] == "max_harness_regression")
    assert same["passed"] and same["value"] == 0.0


def test_an_unreachable_harness_dataset_stops_evaluate_before_any_scoring(
    adapters: dict[str, Any], tmp_path: Path
) -> None:
    cfg = _cfg(tmp_path, adapters, **{"eval.harness_tasks": ["qa_lora_mc", "arc_easy"]})
    run_dir = _run_dir(tmp_path, "offline", adapters["eval_rows"], adapters["good"])
    with pytest.raises(UserError, match=r"eval.harness_tasks .*arc_easy.*could not be loaded"):
        evaluate_candidate(cfg, run_dir)
    assert not (tmp_path / "cache").exists() and not (run_dir / "eval").exists()  # nothing scored or written


def test_missing_or_malformed_inputs_are_user_errors(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            ("eval.cache_dir", str(tmp_path / "cache")),
            ("register.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"),
        ]
    )
    with pytest.raises(UserError, match=r"eval\.jsonl: eval split not found"):
        evaluate_candidate(cfg, tmp_path / "empty")
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "eval.jsonl").write_text(
        '{"id": "a", "question": "q", "answer": "a", "category": "c"}\n{oops\n'
    )
    with pytest.raises(UserError, match=r"eval.jsonl:2: not valid JSON"):
        evaluate_candidate(cfg, run_dir)
    (run_dir / "data" / "eval.jsonl").write_text(
        '{"id": "a", "question": "q", "answer": 3, "category": "c"}\n'
    )
    with pytest.raises(UserError, match=r"eval.jsonl:1: .*answer"):
        evaluate_candidate(cfg, run_dir)
    (run_dir / "data" / "eval.jsonl").write_text(
        '{"id": "a", "question": "q", "answer": "a", "category": "c"}\n'
    )
    with pytest.raises(UserError, match=r"adapter_config\.json"):
        evaluate_candidate(cfg, run_dir)
