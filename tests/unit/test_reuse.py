"""The one fingerprint-and-reuse helper: an earlier result is kept only when made from the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.core.reuse import fingerprint, reusable


def test_fingerprint_follows_the_payload_and_the_file_bytes(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("a\n", encoding="utf-8")
    first = fingerprint({"lr": 0.1, "r": 8}, [data])
    assert first == fingerprint({"r": 8, "lr": 0.1}, [data])  # key order does not matter
    assert first != fingerprint({"lr": 0.2, "r": 8}, [data])
    data.write_text("b\n", encoding="utf-8")
    assert first != fingerprint({"lr": 0.1, "r": 8}, [data])
    assert fingerprint({}, [tmp_path / "absent"]) != fingerprint({})  # a missing input is not "no input"
    assert len(first) == 16


def test_reusable_only_with_the_same_fingerprint_and_every_file(tmp_path: Path) -> None:
    record, weights = tmp_path / "summary.json", tmp_path / "weights.bin"
    record.write_text(json.dumps({"fingerprint": "abc", "loss": 1.0}), encoding="utf-8")
    weights.write_bytes(b"w")

    assert reusable(record, "abc", required=[weights]) == {"fingerprint": "abc", "loss": 1.0}
    assert reusable(record, "other", required=[weights]) is None
    assert reusable(record, "abc", required=[weights, tmp_path / "half-deleted"]) is None
    assert reusable(record, "abc", key="recipe_hash") is None
    record.write_text("{truncated", encoding="utf-8")
    assert reusable(record, "abc") is None
    assert reusable(tmp_path / "never-written.json", "abc") is None
