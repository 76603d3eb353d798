"""The forgetting rule's arithmetic and inputs (the rule on real models: tests/model/test_forgetting.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tasks.core.config import REPO_ROOT, load_config
from tasks.core.errors import UserError
from tasks.plumbing.general_text import general_documents, replay_documents
from tasks.stages.evaluate.general import forgetting_rule


def test_the_rule_is_the_perplexity_ratio_with_a_paired_bootstrap_ci() -> None:
    base = [(20.0, 10), (30.0, 10), (25.0, 10), (40.0, 10)]
    worse = [(nll * 1.2, n) for nll, n in base]  # 20% more NLL per token: perplexity x e^(0.2 * mean NLL)
    rule = forgetting_rule(worse, base, max_increase=0.25, samples=500, confidence=0.95, seed=0)
    expected = math.exp((sum(n for n, _ in worse) - sum(n for n, _ in base)) / 40) - 1
    assert rule["value"] == pytest.approx(expected) and rule["name"] == "max_general_ppl_increase"
    assert rule["perplexity"]["base"] == pytest.approx(math.exp(115 / 40))
    assert rule["ci"]["low"] <= rule["value"] <= rule["ci"]["high"]
    assert rule["passed"] is (expected <= 0.25)
    same = forgetting_rule(base, base, max_increase=0.0, samples=200, confidence=0.95, seed=0)
    assert same["value"] == 0.0 and same["passed"] and same["ci"] == {"low": 0.0, "high": 0.0}
    assert "4 held-out general documents (40 tokens)" in rule["detail"]


def test_the_general_set_comes_from_the_tiny_base_or_a_file(tmp_path: Path) -> None:
    on = ("gate.max_general_ppl_increase", 0.25)
    assert general_documents(load_config(overrides=[("gate.max_general_ppl_increase", None)])) is None
    texts, source = general_documents(load_config(overrides=[on]))  # the tiny base: its held-out documents
    assert len(texts) > 10 and "held-out" in source
    hub = [on, ("base.kind", "hub"), ("base.name_or_path", "meta-llama/Llama-2-7b-chat-hf")]
    with pytest.raises(
        UserError, match=r"eval.general_source: the forgetting rule .* needs held-out general text"
    ):
        general_documents(load_config(overrides=hub))
    assert general_documents(load_config(overrides=[*hub, ("gate.max_general_ppl_increase", None)])) is None
    good = tmp_path / "general.jsonl"
    good.write_text(json.dumps({"text": "One."}) + "\n\n" + json.dumps({"text": "Two."}) + "\n")
    assert general_documents(load_config(overrides=[*hub, ("eval.general_source", str(good))]))[0] == [
        "One.",
        "Two.",
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "One."}) + "\n" + json.dumps({"body": "Two."}) + "\n")
    with pytest.raises(
        UserError, match=r"bad.jsonl: line 2: expected a non-empty string .text. \(check: text\)"
    ):
        general_documents(load_config(overrides=[*hub, ("eval.general_source", str(bad))]))


def test_the_forgetting_value_travels_as_a_key_metric_only_when_the_rule_ran() -> None:
    from tasks.stages.register.lineage import key_metrics

    gate = {
        "metrics": {"candidate": {"token_f1": {"mean": 0.2}}},
        "rules": [{"name": "beats_base", "value": 1}],
    }
    assert key_metrics(gate) == {"token_f1": 0.2}
    gate["rules"].append({"name": "max_general_ppl_increase", "value": 0.04, "passed": True})
    assert key_metrics(gate) == {"token_f1": 0.2, "general_ppl_increase": 0.04}


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO_ROOT / "params").glob("*.yaml")))
def test_every_hub_preset_names_its_general_text_and_replays_nothing(preset: str) -> None:
    """A preset's run stops at validate, naming the file, until the user brings held-out general text."""
    cfg = load_config(REPO_ROOT / "params" / preset)
    assert cfg.gate.max_general_ppl_increase is not None and replay_documents(cfg) is None
    with pytest.raises(UserError, match=r"data/general_text\.jsonl: eval\.general_source not found"):
        general_documents(cfg)


def test_a_missing_replay_file_is_named_by_its_own_key(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[("train.replay_ratio", 0.2), ("train.replay_source", str(tmp_path / "r.jsonl"))]
    )
    with pytest.raises(UserError, match=r"r\.jsonl: train\.replay_source not found"):
        replay_documents(cfg)
