"""Replay against forgetting: general-text blocks beside the SFT rows (train.replay_ratio)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.core.config import load_config
from tasks.core.errors import UserError
from tasks.plumbing.chat import chat_format
from tasks.plumbing.general_text import general_documents, replay_documents, shingles
from tasks.plumbing.loading import load_tokenizer
from tasks.stages.train.data import tokenized_split, with_replay


def _split(path: Path, rows: int) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": str(i), "question": f"What is {i}?", "answer": f"It is {i}.", "category": "c"})
            + "\n"
            for i in range(rows)
        )
    )
    return path


def test_replay_blocks_follow_the_sft_rows_as_plain_language_modelling(
    tiny_base: Path, tmp_path: Path
) -> None:
    cfg = load_config(overrides=[("base.name_or_path", str(tiny_base)), ("train.replay_ratio", 0.5)])
    chat = chat_format(cfg, load_tokenizer(cfg, padding_side="right"))
    sft = tokenized_split(chat, _split(tmp_path / "train.jsonl", 40), tmp_path / "tok", 64)
    texts, source = replay_documents(cfg)
    assert "pretraining" in source
    both = with_replay(chat, sft, texts, (0.5, 64, 1), tmp_path / "tok")
    assert len(both) == 60 and both[:40]["input_ids"] == sft[:]["input_ids"]
    blocks = both[40:]
    assert all(len(ids) == 64 for ids in blocks["input_ids"]) and blocks["labels"] == blocks["input_ids"]
    assert len({tuple(ids) for ids in blocks["input_ids"]}) == 20  # distinct cuts while the text lasts
    again = with_replay(chat, sft, texts, (0.5, 64, 1), tmp_path / "again")
    other = with_replay(chat, sft, texts, (0.5, 64, 2), tmp_path / "other")
    assert again[40:]["input_ids"] == blocks["input_ids"] != other[40:]["input_ids"]
    # The replayed text is never what the forgetting rule scores.
    general = general_documents(load_config(overrides=[("gate.max_general_ppl_increase", 0.1)]))[0]
    assert not shingles(general) & shingles(texts)


def test_replay_needs_text_disjoint_from_the_rules(tmp_path: Path) -> None:
    hub = [
        ("base.kind", "hub"),
        ("base.name_or_path", "Qwen/Qwen2.5-7B-Instruct"),
        ("train.replay_ratio", 0.2),
        ("gate.max_general_ppl_increase", None),
    ]
    with pytest.raises(UserError, match=r"train.replay_source: train.replay_ratio=0.2 replays general text"):
        replay_documents(load_config(overrides=hub))
    text = "one two three four five six seven eight nine ten eleven twelve"
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"text": text}) + "\n")
    overlapping = [
        *hub,
        ("train.replay_source", str(same)),
        ("eval.general_source", str(same)),
        ("gate.max_general_ppl_increase", 0.1),
    ]
    with pytest.raises(UserError, match=r"shares passages with the forgetting rule's documents"):
        replay_documents(load_config(overrides=overlapping))
    assert replay_documents(load_config(overrides=[*hub, ("train.replay_source", str(same))]))[0] == [text]
    assert replay_documents(load_config(overrides=[("train.replay_ratio", 0.0)])) is None


def test_a_copy_of_the_tiny_base_keeps_its_general_and_replay_text(tiny_base: Path, tmp_path: Path) -> None:
    """The tiny base used as a hub base (what a user copying models/tiny-base does) is still known: its
    qa_lora_base.json names the corpus. A directory without it, or naming another corpus, is not."""
    import shutil

    on = [("gate.max_general_ppl_increase", 0.1), ("train.replay_ratio", 0.1), ("base.kind", "hub")]
    cfg = load_config(overrides=[*on, ("base.name_or_path", str(tiny_base))])
    assert general_documents(cfg)[0] == general_documents(load_config(overrides=on[:2]))[0]
    assert "pretraining" in replay_documents(cfg)[1]
    other = shutil.copytree(tiny_base, tmp_path / "other")
    meta = json.loads((other / "qa_lora_base.json").read_text())
    (other / "qa_lora_base.json").write_text(json.dumps({**meta, "corpus_hash": "another"}))
    with pytest.raises(UserError, match=r"eval\.general_source: the forgetting rule"):
        general_documents(load_config(overrides=[*on, ("base.name_or_path", str(other))]))


def test_validate_stops_a_run_whose_general_text_is_missing(tiny_base: Path, tmp_path: Path) -> None:
    """The forgetting rule on, a hub base that is no copy of the tiny base, no eval.general_source: the
    first stage refuses, naming the key, before any row is read or any training starts."""
    import shutil

    from tasks.stages.validate import validate_dataset

    other = shutil.copytree(tiny_base, tmp_path / "base")
    (other / "qa_lora_base.json").unlink()
    overrides = [
        ("base.kind", "hub"),
        ("base.name_or_path", str(other)),
        ("gate.max_general_ppl_increase", 0.1),
        ("train.replay_ratio", 0.0),
    ]
    cfg = load_config(overrides=overrides)
    with pytest.raises(UserError, match=r"^eval\.general_source: the forgetting rule") as err:
        validate_dataset(cfg, tmp_path / "run")
    assert "train.replay_source" not in str(err.value)
    assert not (tmp_path / "run" / "data").exists()
    # With replay on as well (params.yaml's default), one message names both files the base needs.
    with pytest.raises(UserError, match=r"^eval\.general_source: .*; and train\.replay_source: "):
        validate_dataset(
            load_config(overrides=[*overrides[:3], ("train.replay_ratio", 0.2)]), tmp_path / "run"
        )
