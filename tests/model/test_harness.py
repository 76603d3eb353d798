"""lm-evaluation-harness on the tiny base, as the evaluate stage runs it: the local multiple-choice task,
a task YAML of the user's, and the one-line errors for an unknown task and an unreachable dataset
(HF_HUB_OFFLINE=1 here). The rule on trained candidates: tests/model/test_evaluate.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.core.config import REPO_ROOT, load_config
from tasks.core.errors import UserError
from tasks.plumbing.harness import check_tasks, harness_scores
from tasks.stages.evaluate.scoring import ModelSpec, load_model


@pytest.fixture(scope="module")
def loaded(tiny_base: Path) -> tuple[object, object, list[dict[str, str]]]:
    cfg = load_config(overrides=[("base.name_or_path", str(tiny_base)), ("runtime.device", "cpu")])
    model, tokenizer = load_model(cfg, ModelSpec("base", str(tiny_base)), "cpu", "float32")
    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "qa.jsonl").read_text().splitlines()[:40]]
    return model, tokenizer, rows


def _cfg(tiny_base: Path, tasks: list[str]):
    return load_config(
        overrides=[
            ("base.name_or_path", str(tiny_base)),
            ("eval.harness_tasks", tasks),
            ("eval.batch_size", 8),
        ]
    )


def test_the_local_task_and_a_users_yaml_run_offline(loaded: tuple, tiny_base: Path, tmp_path: Path) -> None:
    model, tokenizer, rows = loaded
    own = tmp_path / "tasks" / "mine.yaml"
    own.parent.mkdir()
    data = tmp_path / "tasks" / "mine.jsonl"
    docs = [
        {"q": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 7)], "label": 0} for i in range(12)
    ]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    own.write_text(
        "task: my_arithmetic\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    scores = harness_scores(model, tokenizer, _cfg(tiny_base, ["qa_lora_mc", str(own)]), rows, tmp_path / "w")
    assert set(scores) == {"qa_lora_mc", "my_arithmetic"}
    mc = scores["qa_lora_mc"]
    assert mc["metric"] == "acc_norm" and 0.0 <= mc["value"] <= 1.0 and mc["stderr"] > 0
    assert set(mc["metrics"]) >= {"acc", "acc_norm", "acc_stderr"}
    # 4 choices per question, 40 questions: an accuracy is a multiple of 1/40
    assert mc["metrics"]["acc"] * 40 == pytest.approx(round(mc["metrics"]["acc"] * 40))
    assert scores["my_arithmetic"]["metric"] == "acc" and scores["my_arithmetic"]["value"] * 12 % 1 == 0
    assert (tmp_path / "w" / "qa_lora_mc" / "qa_lora_mc.jsonl").read_text().count("\n") == 40


def test_an_unknown_task_or_an_unreachable_dataset_is_one_line(
    loaded: tuple, tiny_base: Path, tmp_path: Path
) -> None:
    model, tokenizer, rows = loaded
    with pytest.raises(UserError) as unknown:
        harness_scores(model, tokenizer, _cfg(tiny_base, ["no_such_task_xyz"]), rows, tmp_path)
    assert "eval.harness_tasks" in str(unknown.value) and "no_such_task_xyz" in str(unknown.value)
    with pytest.raises(UserError) as offline:
        harness_scores(model, tokenizer, _cfg(tiny_base, ["arc_easy"]), rows, tmp_path)
    text = str(offline.value)
    assert "arc_easy" in text and "could not be loaded" in text and "ai2_arc" in text and "\n" not in text
    # the same checks before any model is loaded (evaluate runs them first)
    with pytest.raises(UserError, match="could not be loaded"):
        check_tasks(_cfg(tiny_base, ["qa_lora_mc", "arc_easy"]), rows)
    with pytest.raises(UserError, match="no_such_task_xyz"):
        check_tasks(_cfg(tiny_base, ["no_such_task_xyz"]), rows)
    check_tasks(_cfg(tiny_base, ["qa_lora_mc"]), rows)
