"""The bundled dataset: data/build_qa_dataset.py reproduces data/qa.jsonl, and the file has the shape
the pipeline expects (fields, row count, unique ids, categories from the script's allowlist)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from qa_factory import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "data" / "build_qa_dataset.py"
DATA = REPO / "data" / "qa.jsonl"
CARD = REPO / "data" / "README.md"
FIELDS = ["id", "question", "answer", "category"]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


def _run_script(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    # A fresh interpreter: pytest's own imports must not influence what the script sees.
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/qa.jsonl rebuilt by this interpreter (any Python 3.11)."""
    out = tmp_path_factory.mktemp("regenerated") / "nested" / "qa.jsonl"
    result = _run_script("--out", str(out))
    assert result.returncode == 0, result.stderr
    assert list(out.parent.iterdir()) == [out]  # no temporary sibling left behind
    return out


def test_output_depends_on_nothing_but_the_python_release(regenerated: Path, tmp_path: Path) -> None:
    """The script's claim, checked on any Python: another hash seed, cwd and environment give the same
    bytes (so the committed file depends only on the release's docstrings, see the next tests)."""
    out = tmp_path / "again.jsonl"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "12345", "LC_ALL": "C", "TZ": "Asia/Tokyo"}
    result = _run_script("--out", str(out), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == regenerated.read_bytes()


@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11), reason="the committed file is built from 3.11 docstrings"
)
def test_every_311_regenerates_the_same_questions_and_most_answers(
    regenerated: Path, rows: list[dict[str, str]]
) -> None:
    """Ids, questions and categories come from the API's names, answers from docstrings. A patch release
    adds a little API and rewords some docstrings (3.11.4 backported tarfile's extraction filters, so
    `TarInfo.replace` and a reworded `HTTPResponse.read` are missing on 3.11.2). So on any 3.11: nearly
    every committed row comes back, each with the same question and category, nearly every answer the
    same."""
    new = {row["id"]: row for row in map(json.loads, regenerated.read_text(encoding="utf-8").splitlines())}
    missing = [row["id"] for row in rows if row["id"] not in new]
    assert len(missing) <= 0.005 * len(rows), (
        f"{len(missing)} committed rows are not regenerated, e.g. {missing[:3]}"
    )
    back = [row for row in rows if row["id"] in new]
    for row in back:
        assert (new[row["id"]]["question"], new[row["id"]]["category"]) == (row["question"], row["category"])
    reworded = [row["id"] for row in back if new[row["id"]]["answer"] != row["answer"]]
    assert len(reworded) <= 0.02 * len(rows), f"{len(reworded)} answers differ, e.g. {reworded[:3]}"


def test_script_reproduces_committed_file_byte_for_byte(script: ModuleType, regenerated: Path) -> None:
    """Byte for byte only on the release that wrote it: the dependency is stated (GENERATED_WITH, also in
    the data card) and is the only condition."""
    if platform.python_version() != script.GENERATED_WITH:
        pytest.skip(
            f"answers come from docstrings, which differ between releases: the file was generated with "
            f"{script.GENERATED_WITH}, this is {platform.python_version()} (the tests above still ran)"
        )
    assert regenerated.read_bytes() == DATA.read_bytes(), (
        "regenerate with: .venv/bin/python data/build_qa_dataset.py"
    )


def test_script_refuses_stripped_docstrings(tmp_path: Path) -> None:
    out = tmp_path / "qa.jsonl"
    result = subprocess.run(
        [sys.executable, "-OO", str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "-OO" in result.stderr
    assert not out.exists()


def test_file_is_utf8_jsonl_with_trailing_newline_and_small() -> None:
    raw = DATA.read_bytes()
    assert raw.endswith(b"\n") and not raw.endswith(b"\n\n")
    assert b"\r" not in raw
    raw.decode("utf-8")
    assert len(raw) < 2 * 1024 * 1024


def test_rows_have_expected_fields_in_order(rows: list[dict[str, str]]) -> None:
    assert len(rows) >= 2000
    for row in rows:
        assert list(row) == FIELDS
        assert all(isinstance(row[field], str) for field in FIELDS)
        assert row["question"].strip()
        assert re.fullmatch(r"[0-9a-f]{12}", row["id"])


def test_ids_and_questions_are_unique(rows: list[dict[str, str]]) -> None:
    assert len({row["id"] for row in rows}) == len(rows)
    assert len({row["question"] for row in rows}) == len(rows)


def test_categories_are_allowlisted_top_level_modules(script: ModuleType, rows: list[dict[str, str]]) -> None:
    allowed = {name.split(".", 1)[0] for name in script.MODULES}
    categories = {row["category"] for row in rows}
    assert categories <= allowed
    # Most allowlisted modules contribute rows: the data set is not dominated by a handful of modules.
    assert len(categories) >= 0.7 * len(allowed)
    for row in rows:
        assert row["category"] in row["question"]


def test_answers_respect_the_word_cap(script: ModuleType, rows: list[dict[str, str]]) -> None:
    cap = script.MAX_ANSWER_WORDS
    # A single first sentence longer than the cap is cut to it and marked with " ...".
    assert all(len(row["answer"].split()) <= cap + 1 for row in rows)


def test_data_card_states_the_row_count_and_python_version(
    script: ModuleType, rows: list[dict[str, str]]
) -> None:
    card = CARD.read_text(encoding="utf-8")
    assert f"{len(rows):,}" in card, "data/README.md row count is stale"
    assert script.GENERATED_WITH in card


def test_summary_takes_first_paragraph_and_skips_a_signature_line(script: ModuleType) -> None:
    doc = (
        "reduce(function, iterable) -> value\n\n    Apply a function\n    of two arguments.\n\n    More text."
    )
    assert script.first_paragraph(doc) == "Apply a function of two arguments."
    assert script.first_paragraph("   ") == ""


def test_cap_words_keeps_whole_sentences(script: ModuleType) -> None:
    sentence = "Word " * 9 + "end."  # 10 words
    text = " ".join([sentence] * 8)  # 80 words
    capped = script.cap_words(text, max_words=35)
    assert capped == " ".join([sentence] * 3)
    long_sentence = "word " * 50 + "end."
    assert script.cap_words(long_sentence, max_words=20) == " ".join(["word"] * 20) + " ..."
    assert script.cap_words("Short one.", max_words=20) == "Short one."
