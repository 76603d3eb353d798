"""The whole pipeline on each chat family a user brings (tests/chat_families.py): validate -> version ->
train -> evaluate -> export -> register, pointed at a local base of that family, no code edited.

Each run is small (630 rows, 60 steps, 40 eval rows): it is here for the format, not the quality. The
gate keeps its stop rule (at least half the answers end with the end-of-turn token; the family's new
end-of-turn token is learnt in these 60 steps: 40 of 40 measured) and waives the quality rules a
60-step run cannot meet decisively (min_improvement -1, any top-answer share). Then the exported ONNX
model and the registered MLflow model answer as the family does: they stop at its end-of-turn token and
say none of its markers, and the chat format's fingerprint is the same from training to the registry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chat_families import FAMILIES, build_family_base

from tasks.core.config import REPO_ROOT, load_config

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROWS = 700  # of data/qa.jsonl: about 630 train and 70 eval rows after the split
QUESTIONS = 8  # asked of the ONNX export and the registered model


def _overrides(root: Path, base: Path, name: str) -> list[tuple[str, Any]]:
    return [
        ("base.name_or_path", str(base)),
        ("base.kind", "hub"),
        ("data.source", str(root / "qa.jsonl")),
        ("data.allowed_roots", [str(root)]),
        ("data.dvc_remote", str(root / "dvc-remote")),
        ("lora.r", 8),
        ("lora.alpha", 16),
        ("lora.target_modules", ["q_proj", "v_proj"]),
        ("lora.modules_to_save", ["embed_tokens"]),  # the family's new tokens are trained in full
        ("train.max_steps", 60),
        ("train.save_steps", 60),
        ("train.learning_rate", 0.004),
        ("eval.max_rows", 40),
        ("eval.max_new_tokens", 24),
        ("eval.bootstrap_samples", 200),
        ("eval.cache_dir", None),
        ("gate.min_improvement", -1.0),
        ("gate.max_top_answer_share", 1.0),
        ("gate.max_general_ppl_increase", None),  # a family base is no copy of the tiny base: no general text
        ("train.replay_ratio", 0.0),
        ("gate.min_slice_size", 1000),
        ("gate.max_latency_regression", 1.0),
        ("export.parity_prompts", 2),
        ("export.parity_new_tokens", 8),
        ("export.serving_prompts", 4),
        ("export.serving_repeats", 1),
        ("register.tracking_uri", f"sqlite:///{root / 'mlflow.db'}"),
        ("register.model_name", f"qa-{name.replace('.', '-')}"),
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("family-data")
    lines = (REPO_ROOT / "data" / "qa.jsonl").read_text(encoding="utf-8").splitlines()[:ROWS]
    (root / "qa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_base_runs_the_pipeline_and_serves_in_its_format(
    name: str, tiny_base: Path, data_root: Path, tmp_path: Path
) -> None:
    import mlflow

    from tasks.plumbing.onnx_generate import load_onnx_generator
    from tasks.runners.pipeline import run_pipeline

    family = FAMILIES[name]
    base = build_family_base(name, tiny_base, tmp_path / "base")
    cfg = load_config(overrides=_overrides(data_root, base, name))
    result = run_pipeline(cfg, tmp_path / "run")
    assert result["gate"]["passed"], result["gate"]
    assert result["register"]["promoted"]
    candidate = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["candidate"]
    assert candidate["eos_rate"] >= 0.8, candidate  # it learnt to end its turn

    # The export stops at the family's end-of-turn token and says none of its markers.
    onnx = load_onnx_generator(result["export"]["onnx_dir"], provider="CPU")
    rows = [json.loads(line) for line in (tmp_path / "run" / "data" / "eval.jsonl").read_text().splitlines()]
    questions = [r["question"] for r in rows[:QUESTIONS]]
    out = onnx.generate([onnx.chat.prompt(q) for q in questions], max_new_tokens=48)
    eot = onnx.tokenizer.convert_tokens_to_ids(family.end_of_turn)
    ended = [ids for ids, done in zip(out.token_ids, out.finished, strict=True) if done]
    assert len(ended) >= QUESTIONS // 2 and all(ids[-1] == eot for ids in ended), out.token_ids
    markers = [m for m in (*family.specials, family.end_of_turn, "[INST]", "<|im_start|>") if m]
    assert not [t for t in out.texts if any(m in t for m in markers)], out.texts

    # The registered model answers exactly as the export, in the same chat format.
    mlflow.set_tracking_uri(cfg.register.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.register.model_name}@champion")
    answers = model.predict({"question": questions}, params={"max_new_tokens": 48})["answer"].tolist()
    assert answers == out.texts
    trained = json.loads((tmp_path / "run" / "train" / "train_summary.json").read_text())["chat"]
    exported = json.loads(Path(result["export"]["summary"]).read_text())["chat"]
    version = mlflow.MlflowClient().get_model_version(cfg.register.model_name, result["register"]["version"])
    assert trained["fingerprint"] == exported["fingerprint"] == version.tags["qa_lora.chat_fingerprint"]
    assert model.metadata.metadata["qa_lora_chat"]["fingerprint"] == trained["fingerprint"]
    assert trained["end_of_turn"] == family.end_of_turn
