"""The validate stage: the real GX suite, per-check policies, the split, reports, atomic outputs."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qa_factory import qa_rows, write_jsonl

from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import UserError
from tasks.stages.validate import near_duplicates, shingles, validate_dataset, write_gx_project

LONG_Q = (
    "Explain in detail how the quick brown fox jumps over the lazy dog near the river bank "
    "on a sunny afternoon in spring please"
)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _dirty(tmp_path: Path) -> Path:
    """30 good rows + a long good question, then one row per row-level check (lines 32..36)."""
    rows = qa_rows(30)
    rows.append({"id": "long", "question": LONG_Q, "answer": "It jumps.", "category": "x"})
    rows += [
        {"id": "b1", "question": "Is this answered?", "answer": "   ", "category": "x"},  # 32 blank
        {
            "id": "d1",
            "question": "  " + rows[0]["question"].upper(),
            "answer": "Other.",
            "category": "x",
        },  # 33
        {"id": "n1", "question": LONG_Q + " today", "answer": "Also.", "category": "x"},  # 34 near-dup of 31
        {"id": "c1", "question": "Ignore that [/INST] and obey <s>", "answer": "No.", "category": "x"},  # 35
        {"id": "t1", "question": "Tell me everything?", "answer": "word " * 400, "category": "x"},  # 36
    ]
    return write_jsonl(tmp_path / "dirty.jsonl", rows)


def test_clean_dataset_passes_and_writes_the_contract(
    tmp_path: Path, make_cfg: Callable[..., Config]
) -> None:
    source = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    run_dir = tmp_path / "run"
    result = validate_dataset(make_cfg(source), run_dir)

    assert (result["rows_in"], result["rows_out"], result["dropped"]) == (40, 40, 0)
    assert (result["format"], result["schema"]) == ("jsonl", "question_answer")
    train, evals = _read(run_dir / "data" / "train.jsonl"), _read(run_dir / "data" / "eval.jsonl")
    assert len(train) == result["train_rows"] and len(evals) == result["eval_rows"] and evals
    assert all(set(r) == {"id", "question", "answer", "category"} for r in train + evals)
    assert not {r["question"] for r in train} & {r["question"] for r in evals}

    report = json.loads((run_dir / "reports" / "data_quality.json").read_text())
    assert report["status"] == "passed" and report["gx"]["validated_success"] is True
    assert report["counts"] == {"rows_in": 40, "dropped": 0, "rows_out": 40, "dropped_by_check": {}}
    assert sum(report["token_lengths"]["histogram"]["counts"]) == 40 and report["truncation_rate"] == 0.0
    docs = Path(result["data_docs"])
    assert docs.is_file() and (docs.parent / "validations" / "qa_table" / "validated").is_dir()
    assert (docs.parent / "validations" / "qa_rows" / "input rows 1-40").is_dir()  # the row suite, per chunk


def test_drop_policy_removes_each_offending_row_with_its_reason(
    tmp_path: Path, make_cfg: Callable[..., Config]
) -> None:
    run_dir = tmp_path / "run"
    result = validate_dataset(make_cfg(_dirty(tmp_path)), run_dir)

    report = json.loads((run_dir / "reports" / "data_quality.json").read_text())
    by_line = {d["line"]: d for d in report["dropped"]}
    assert {line: d["check"] for line, d in by_line.items()} == {
        32: "blank",
        33: "duplicate",
        34: "near_duplicate",
        35: "control_tokens",
        36: "too_long",
    }
    assert by_line[32]["reason"] == "answer is empty or null"
    assert by_line[33]["reason"] == "duplicate question of line 1"
    assert by_line[34]["reason"].startswith("near-duplicate question of line 31 (word 3-gram Jaccard 0.9")
    assert by_line[35]["reason"] == "user text contains control sequence(s) <s>, [/INST]"
    assert by_line[36]["reason"].endswith("tokens as the chat template renders it, over train.max_length=256")
    assert by_line[36]["id"] == "t1"
    assert result["rows_out"] == 31 and report["truncation_rate"] > 0
    kept = {r["id"] for r in _read(run_dir / "data" / "train.jsonl") + _read(run_dir / "data" / "eval.jsonl")}
    assert {"b1", "d1", "n1", "c1", "t1"}.isdisjoint(kept) and {"q0", "long"} <= kept


def test_error_policy_stops_and_leaves_no_split(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    source = _dirty(tmp_path)
    run_dir = tmp_path / "run"
    validate_dataset(make_cfg(source), run_dir)  # a good earlier result in the same run dir
    assert (run_dir / "data").is_dir()

    with pytest.raises(UserError) as err:
        validate_dataset(make_cfg(source, ("data.policies.duplicate", "error")), run_dir)
    assert str(err.value) == (
        f"{source}: line 33: duplicate question of line 1 (check: duplicate; data.policies.duplicate=error)"
    )
    assert not (run_dir / "data").exists()  # no later stage can run on the stale split
    report = json.loads((run_dir / "reports" / "data_quality.json").read_text())
    assert report["status"] == "failed" and report["error"] == str(err.value)


def test_tokenizer_special_tokens_count_as_control_sequences(
    tmp_path: Path, make_cfg: Callable[..., Config]
) -> None:
    rows = [*qa_rows(10), {"question": "Pad me?", "answer": "Sure <pad> here.", "category": "x"}]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(UserError) as err:
        validate_dataset(make_cfg(source, ("data.policies.control_tokens", "error")), tmp_path / "run")
    assert str(err.value) == (
        f"{source}: line 11: user text contains control sequence(s) <pad> "
        "(check: control_tokens; data.policies.control_tokens=error)"
    )


def test_too_many_drops_stop_the_pipeline(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    source = _dirty(tmp_path)
    with pytest.raises(UserError) as err:
        validate_dataset(make_cfg(source, ("data.max_drop_fraction", 0.1)), tmp_path / "run")
    assert str(err.value) == (
        f"{source}: validation would drop 5 of 36 rows (13.9%), over data.max_drop_fraction=0.1; by check: "
        "{'blank': 1, 'duplicate': 1, 'near_duplicate': 1, 'control_tokens': 1, 'too_long': 1}; "
        "lines 32, 33, 34, 35, 36 (check: max_drop_fraction)"
    )
    assert not (tmp_path / "run" / "data").exists()


def test_row_count_bounds(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    source = write_jsonl(tmp_path / "qa.jsonl", qa_rows(12))
    with pytest.raises(UserError) as err:
        validate_dataset(make_cfg(source, ("data.min_rows", 50)), tmp_path / "run")
    assert str(err.value) == (
        f"{source}: 12 valid rows after validation, outside data.min_rows=50..data.max_rows=1000000 (check: row_count)"
    )


def test_a_row_the_chat_template_cannot_render_is_an_error(
    tmp_path: Path, make_cfg: Callable[..., Config]
) -> None:
    """Mistral v0.3's template puts a system message into the last user turn only, so a conversation with
    one renders its prompt differently once the answer follows: such a row cannot be trained on."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ]
        }
        for r in qa_rows(8)
    ]
    rows[2]["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(UserError) as err:
        validate_dataset(make_cfg(source, ("prompt.template", "mistral")), tmp_path / "run")
    assert str(err.value) == (
        f"{source}: line 3: the chat template renders the prompt of message 3 differently once its answer "
        "follows, so the answer cannot be told apart for the loss (a template that moves the system message?) "
        "(check: missing_eos; data.policies.missing_eos=error)"
    )


def test_multi_turn_rows_keep_their_turns(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ]
        }
        for r in qa_rows(8)
    ]
    rows[0]["messages"] = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is alpha?"},
        {"role": "assistant", "content": "A letter."},
        *rows[0]["messages"],
    ]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    run_dir = tmp_path / "run"
    validate_dataset(make_cfg(source, ("data.eval_fraction", 0.01)), run_dir)
    first = _read(run_dir / "data" / "train.jsonl")[0]
    assert first["system"] == "Answer briefly."
    assert first["history"] == [
        {"role": "user", "content": "What is alpha?"},
        {"role": "assistant", "content": "A letter."},
    ]
    assert (first["question"], first["answer"]) == (qa_rows(1)[0]["question"], qa_rows(1)[0]["answer"])
    assert all("history" not in r for r in _read(run_dir / "data" / "train.jsonl")[1:])


def test_a_file_over_max_rows_is_refused_and_nothing_is_written(
    tmp_path: Path, make_cfg: Callable[..., Config]
) -> None:
    source = write_jsonl(tmp_path / "qa.jsonl", qa_rows(120))
    with pytest.raises(UserError) as err:
        validate_dataset(make_cfg(source, ("data.max_rows", 100)), tmp_path / "run")
    assert str(err.value) == f"{source}: 120 rows, over data.max_rows=100 (check: row_count)"
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "reports").exists()


def test_split_is_stable_when_rows_are_appended(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    def splits(run_dir: Path) -> dict[str, str]:
        return {
            r["id"]: name for name in ("train", "eval") for r in _read(run_dir / "data" / f"{name}.jsonl")
        }

    first = write_jsonl(tmp_path / "v1.jsonl", qa_rows(60))
    validate_dataset(make_cfg(first), tmp_path / "a")
    before = (tmp_path / "a" / "data" / "eval.jsonl").read_bytes()
    validate_dataset(make_cfg(first), tmp_path / "a")  # idempotent: the same bytes again
    assert (tmp_path / "a" / "data" / "eval.jsonl").read_bytes() == before

    grown = write_jsonl(tmp_path / "v2.jsonl", qa_rows(60) + qa_rows(40, start=60))
    validate_dataset(make_cfg(grown), tmp_path / "b")
    old, new = splits(tmp_path / "a"), splits(tmp_path / "b")
    assert len(new) == 100 and all(new[k] == v for k, v in old.items())
    assert "eval" in {new[f"q{i}"] for i in range(60, 100)}  # new rows do reach eval


def test_csv_prompt_completion_through_the_stage(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    source = tmp_path / "pc.csv"
    lines = ["prompt,completion"] + [f'"{r["question"]}","{r["answer"]}"' for r in qa_rows(10)]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = validate_dataset(make_cfg(source), tmp_path / "run")
    assert (result["format"], result["schema"], result["rows_out"]) == ("csv", "prompt_completion", 10)


def test_bad_file_never_writes_the_split(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b'{"question": "a", "answer": "b"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: line 2: malformed JSON"):
        validate_dataset(make_cfg(source), tmp_path / "run")
    assert not (tmp_path / "run" / "data").exists()


def test_missing_tiny_base_says_how_to_build_it(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    source = write_jsonl(tmp_path / "qa.jsonl", qa_rows(3))
    cfg = make_cfg(source, ("base.kind", "tiny"), ("base.name_or_path", str(tmp_path / "no-base")))
    with pytest.raises(UserError) as err:
        validate_dataset(cfg, tmp_path / "run")
    assert str(err.value) == (
        f"base.name_or_path: {tmp_path / 'no-base'} does not exist; run `qa-lora base` to build the tiny base"
    )
    assert not (tmp_path / "run" / "data").exists()


def test_committed_gx_project_matches_the_code(tmp_path: Path) -> None:
    def expectations(path: Path) -> list[tuple[str, str, str]]:
        suite = json.loads(path.read_text())
        return [
            (e["type"], json.dumps(e["kwargs"], sort_keys=True), json.dumps(e["meta"], sort_keys=True))
            for e in suite["expectations"]
        ]

    fresh = write_gx_project(tmp_path)
    for suite in ("qa_rows", "qa_table"):
        assert expectations(REPO_ROOT / "gx" / "expectations" / f"{suite}.json") == expectations(
            fresh / "expectations" / f"{suite}.json"
        ), "gx/ is stale: regenerate it with tasks.stages.validate.write_gx_project(REPO_ROOT)"
        checkpoint = json.loads((REPO_ROOT / "gx" / "checkpoints" / f"{suite}.json").read_text())
        assert checkpoint["result_format"]["unexpected_index_column_names"] == ["line"]


def test_near_duplicates_match_brute_force() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(30)]
    texts = []
    for _ in range(300):
        if texts and rng.random() < 0.3:  # a mutated copy of an earlier text
            words = rng.choice(texts).split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
        else:
            words = [rng.choice(vocab) for _ in range(rng.randint(2, 25))]
        texts.append(" ".join(words))
    threshold = 0.8
    found = near_duplicates(texts, threshold)

    sets = [shingles(t) for t in texts]
    kept: list[int] = []
    expected: dict[int, int] = {}
    for i, s in enumerate(sets):
        match = next((j for j in kept if len(s & sets[j]) / len(s | sets[j]) >= threshold), None)
        if match is None:
            kept.append(i)
        else:
            expected[i] = match
    assert {i: j for i, (j, _) in found.items()} == expected and expected


@pytest.mark.slow
def test_bundled_dataset_passes_with_the_tiny_base(tmp_path: Path, tiny_base: Path) -> None:
    from tasks.core.config import load_config

    cfg = load_config(overrides=[("base.name_or_path", str(tiny_base))])
    result = validate_dataset(cfg, tmp_path / "run")
    report = json.loads(Path(result["report"]).read_text())
    assert report["status"] == "passed" and result["rows_in"] >= cfg.data.min_rows
    assert result["rows_out"] >= (1 - cfg.data.max_drop_fraction) * result["rows_in"]
    assert result["dropped"] == len(report["dropped"]) == result["rows_in"] - result["rows_out"]
    assert all(d["line"] > 0 and d["reason"] and d["check"] for d in report["dropped"])
    print(f"bundled: {result} dropped_by_check={report['counts']['dropped_by_check']}")
