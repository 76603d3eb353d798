"""The gate's champion rule, defended end to end through the real registry (MLflow on SQLite).

A champion is crowned the way the pipeline crowns one: its run is evaluated (no champion yet), given
the export's files (the real merged model; a stand-in ONNX graph, which evaluation never reads) and
registered by the register stage, which promotes it. A later candidate is then evaluated by the stage's
public entry, which fetches that champion from the registry and scores its downloaded merged model.

Two adapters trained by the real train stage on a tiny budget make the two sides: "good" learned both
answer categories (120 steps: at 60 this base had learned only the first), "one_slice" saw only
"returns". Each beats the base; good beats one_slice on "raises".
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from champion_fixture import stand_in_chat_format
from small_lora import small_lora_overrides

from tasks.core.config import Config, load_config
from tasks.core.errors import StoreUnavailable, UserError
from tasks.core.layout import GateFailed, RunLayout, read_gate
from tasks.stages.evaluate import evaluate_candidate

pytestmark = pytest.mark.slow

FUNCS = [
    f"{verb}_{noun}"
    for verb in ("get", "load", "parse", "make", "read", "find")
    for noun in ("item", "path", "name", "value", "entry", "token", "field", "block")
]
ANSWERS = {"returns": "A new list.", "raises": "ValueError on bad input."}
QUESTIONS = {
    "returns": ["What does {f}() return?", "What is the return value of {f}()?"],
    "raises": ["When does {f}() raise an exception?", "Which error can {f}() raise?"],
}
EVAL_EVERY = 4  # one question in four is held out: about 24 eval rows per category


def _dataset() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = []
    for cat, templates in QUESTIONS.items():
        for f in FUNCS:
            for t in templates:
                q = t.format(f=f)
                rid = hashlib.sha256(q.encode()).hexdigest()[:12]
                rows.append({"id": rid, "question": q, "answer": ANSWERS[cat], "category": cat})
    random.Random(0).shuffle(rows)
    held_out = [r for r in rows if int(r["id"], 16) % EVAL_EVERY == 0]
    return [r for r in rows if r not in held_out], held_out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _cfg(base: Path, registry: str, tmp: Path, model_name: str = "qa-lora-gate", **extra: Any) -> Config:
    overrides = {
        "base.name_or_path": str(base),
        "register.tracking_uri": registry,
        "register.model_name": model_name,
        "runtime.device": "cpu",
        "eval.cache_dir": str(tmp / "cache"),
        "eval.max_new_tokens": 16,
        "eval.batch_size": 16,
        "eval.bootstrap_samples": 200,
        "gate.min_slice_size": 10,  # both categories gate
        # one reference answer per category by design: a model that learnt it repeats it, so the
        # top-answer floor (for real data; unit-tested in tests/unit/test_metrics.py) is off here
        "gate.max_top_answer_share": 1.0,
        **extra,
    }
    return load_config(overrides=[*small_lora_overrides(), *overrides.items()])


def _train(base: Path, registry: str, tmp: Path, name: str, rows: list, eval_rows: list, steps: int) -> Path:
    """A LoRA adapter from the real train stage (TRL SFTTrainer), on a tiny budget."""
    from tasks.stages.train import train_adapter

    run = RunLayout.of(tmp / name)
    _write_jsonl(run.train_split, rows)
    _write_jsonl(run.eval_split, eval_rows)
    train = {"max_steps": steps, "per_device_train_batch_size": 16, "learning_rate": 5e-3, "save_steps": 1000}
    cfg = _cfg(base, registry, tmp, **{f"train.{k}": v for k, v in train.items()})
    train_adapter(cfg, run.root)
    assert (run.adapter_dir / "adapter_config.json").is_file()
    return run.adapter_dir


@pytest.fixture(scope="module")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("gate-champion")
    registry = f"sqlite:///{tmp / 'mlflow.db'}"
    train_rows, eval_rows = _dataset()
    returns_only = [r for r in train_rows if r["category"] == "returns"]
    return {
        "base": tiny_base,
        "registry": registry,
        "eval_rows": eval_rows,
        "good": _train(tiny_base, registry, tmp, "good", train_rows, eval_rows, steps=120),
        "one_slice": _train(tiny_base, registry, tmp, "one_slice", returns_only, eval_rows, steps=60),
    }


def _new_run(tmp: Path, name: str, adapter: Path, eval_rows: list[dict[str, str]]) -> RunLayout:
    """A run directory as the pipeline leaves it before evaluate: the eval split and a trained adapter."""
    run = RunLayout.of(tmp / name)
    _write_jsonl(run.eval_split, eval_rows)
    shutil.copytree(adapter, run.adapter_dir)
    return run


def _export_files(base: Path, run: RunLayout) -> None:
    """What the export stage leaves for the register stage: the real merged model (evaluation scores it
    when this run is champion), a stand-in ONNX kit (evaluation never reads it), summary and model card."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, run.adapter_dir).merge_and_unload().save_pretrained(run.merged_dir)
    AutoTokenizer.from_pretrained(run.adapter_dir).save_pretrained(run.merged_dir)
    _write_onnx_stand_in(run.onnx_dir)
    run.export_summary.write_text(json.dumps({"provider": "CPUExecutionProvider"}))
    run.model_card.write_text("# model card\n")
    run.version_file.write_text(json.dumps({"dataset_hash": "d41d8cd98f00b204e9800998ecf8427e"}))


def _write_onnx_stand_in(out: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out.mkdir(parents=True)
    weight = numpy_helper.from_array(np.zeros((1, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "stand-in",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(out / "model.onnx")
    )
    (out / "onnx_layout.json").write_text(json.dumps({"format": "qa-lora-onnx-kv/1"}))
    stand_in_chat_format(out)
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


def _crown(cfg: Config, trained: dict[str, Any], tmp: Path, adapter: str) -> str:
    """Evaluate, export and register `adapter` in a registry without a champion: it becomes champion."""
    from tasks.stages.register import register_model

    run = _new_run(tmp, f"champion-{adapter}", trained[adapter], trained["eval_rows"])
    first = evaluate_candidate(cfg, run.root)
    assert first["passed"] and first["champion_version"] is None, first["reasons"]
    _export_files(trained["base"], run)
    reg = register_model(cfg, run.root)
    assert reg["promoted"] and reg["champion_after"] == reg["version"], reg
    return reg["version"]


def _champion_alias(cfg: Config) -> tuple[str, int]:
    """(champion version, number of versions) as the registry holds them now."""
    from mlflow import MlflowClient

    uri = cfg.register.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = cfg.register.model_name
    versions = client.search_model_versions(f"name = '{name}'")
    return str(client.get_model_version_by_alias(name, "champion").version), len(versions)


def _rules(run: RunLayout) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in read_gate(run.root)["rules"]}


def test_weaker_candidate_fails_the_champion_rule_and_is_not_promoted(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    from tasks.stages.register import register_model

    cfg = _cfg(trained["base"], trained["registry"], tmp_path, model_name="gate-weaker")
    champion = _crown(cfg, trained, tmp_path, "good")
    run = _new_run(tmp_path, "candidate", trained["one_slice"], trained["eval_rows"])

    result = evaluate_candidate(cfg, run.root)

    assert not result["passed"] and result["champion_version"] == champion
    rules = _rules(run)
    assert rules["beats_base:token_f1"]["passed"]  # a real improvement on the base ...
    assert not rules["no_regression:token_f1[raises]"]["passed"]  # ... that loses what the champion knew
    assert rules["no_regression:token_f1[returns]"]["passed"]
    failed = {name for name, r in rules.items() if not r["passed"]}
    assert failed and all(name.startswith("no_regression:") for name in failed), failed
    assert any(r.startswith("no_regression:token_f1[raises]: ") for r in result["reasons"])
    assert "the champion answered right, the candidate now does not" in run.eval_report.read_text()

    # Nothing downstream promotes it: the gate reader refuses, and so does the register stage.
    with pytest.raises(GateFailed, match=r"no_regression:token_f1\[raises\]"):
        read_gate(run.root, require_pass=True)
    _export_files(trained["base"], run)
    with pytest.raises(UserError, match="gate failed"):
        register_model(cfg, run.root)
    assert _champion_alias(cfg) == (champion, 1)


def test_candidate_that_beats_the_champion_passes_and_is_promoted(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    from tasks.stages.register import register_model

    cfg = _cfg(trained["base"], trained["registry"], tmp_path, model_name="gate-stronger")
    champion = _crown(cfg, trained, tmp_path, "one_slice")
    run = _new_run(tmp_path, "candidate", trained["good"], trained["eval_rows"])

    result = evaluate_candidate(cfg, run.root)

    assert result["passed"] and result["champion_version"] == champion, result["reasons"]
    rules = _rules(run)
    raises = rules["no_regression:token_f1[raises]"]
    assert raises["passed"] and raises["value"] > 0  # better than the champion where it was weak
    assert rules["no_regression:token_f1"]["passed"] and "no_regression:champion" not in rules
    assert result["candidate"]["token_f1"] > result["champion"]["token_f1"]

    _export_files(trained["base"], run)
    reg = register_model(cfg, run.root)
    assert reg["promoted"] and reg["champion_before"] == champion
    assert _champion_alias(cfg) == (reg["version"], 2)


def test_unreadable_registry_fails_loudly(trained: dict[str, Any], tmp_path: Path) -> None:
    """No silent "evaluate without a champion" when the registry cannot be read."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the registry's folder should be")
    cfg = _cfg(trained["base"], f"sqlite:///{blocker / 'mlflow.db'}", tmp_path)
    run = _new_run(tmp_path, "candidate", trained["good"], trained["eval_rows"])
    with pytest.raises(StoreUnavailable, match=r"register\.tracking_uri"):
        evaluate_candidate(cfg, run.root)
    assert not run.eval_dir.exists()
