"""The tiny base's pretraining corpus: committed (data/base_corpus.jsonl), read from the file rather than
from the running interpreter, reproducible by its builder, and free of the Q&A answers it must not leak."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from qa_factory import load_script

from tasks.core.errors import UserError
from tasks.plumbing.tiny_corpus import CORPUS_FILE, corpus_hash, pretraining_corpus

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "data" / "build_base_corpus.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script(SCRIPT)


def _hash_in_fresh_python(pythonpath: Path | None = None) -> str:
    code = (
        "from tasks.plumbing.tiny_corpus import corpus_hash, pretraining_corpus\n"
        "train, heldout = pretraining_corpus()\n"
        "print(corpus_hash((*train, *heldout)))\n"
    )
    env = {"PATH": "/usr/bin:/bin"} | ({"PYTHONPATH": str(pythonpath)} if pythonpath else {})
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_corpus_does_not_come_from_the_running_interpreter(tmp_path: Path) -> None:
    """A Python whose bundled docs differ (here: `pydoc_data.topics` shadowed by a one-topic module, as
    another build of the same release differs) still reads the same corpus, so it builds the same base."""
    fake = tmp_path / "pydoc_data"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "topics.py").write_text("topics = {'if': 'Another build wrote other docs.'}\n")
    assert _hash_in_fresh_python(tmp_path) == _hash_in_fresh_python()


def test_the_builder_reproduces_the_committed_file(script: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "base_corpus.jsonl"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert list(out.parent.iterdir()) == [out]  # no temporary sibling left behind
    if platform.python_version() != script.GENERATED_WITH:
        pytest.skip(f"the corpus is {script.GENERATED_WITH}'s docs; this is {platform.python_version()}")
    assert out.read_bytes() == CORPUS_FILE.read_bytes(), (
        "rebuild with: .venv/bin/python data/build_base_corpus.py"
    )


def test_the_corpus_has_train_and_heldout_documents_and_a_stable_hash() -> None:
    train, heldout = pretraining_corpus()
    assert len(train) > 100 and len(heldout) > 10
    assert {name for name, _ in heldout} <= {name for name, _ in train}  # held-out tails of train topics
    assert all(text.strip() for _, text in (*train, *heldout))
    assert corpus_hash(train) != corpus_hash(heldout)
    assert corpus_hash(train) == corpus_hash(tuple(train))


def test_no_qa_answer_leaks_into_pretraining_beyond_the_pdb_commands() -> None:
    """Function/class/method docstrings are the Q&A answers and stay out. The one overlap is pdb's
    command help (`c(ont(inue)) Continue execution, ...`), which the language reference's debugger topic
    quotes verbatim; any other answer found in the corpus is a leak into the eval split."""
    train, heldout = pretraining_corpus()
    text = " ".join(" ".join(doc.split()) for _, doc in (*train, *heldout))
    rows = [
        json.loads(line) for line in (REPO / "data" / "qa.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    leaked = [row for row in rows if len(row["answer"].split()) >= 6 and row["answer"] in text]
    assert all(row["category"] == "pdb" for row in leaked), [row["question"] for row in leaked]
    assert len(leaked) <= 10


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ('{"name": "topics/if", "split": "train", "text": "ok"}\nnot json\n', ":2:"),
        ('{"name": "topics/if", "split": "test", "text": "ok"}\n', ":1:"),
        ('{"name": "topics/if", "text": "ok"}\n', ":1:"),
    ],
)
def test_a_damaged_corpus_is_a_user_error_naming_the_line(tmp_path: Path, content: str, where: str) -> None:
    path = tmp_path / "base_corpus.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match="name, split: train\\|heldout, text") as err:
        pretraining_corpus(path)
    assert f"{path}{where}" in str(err.value)


def test_a_missing_corpus_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="restore it from git") as err:
        pretraining_corpus(tmp_path / "gone.jsonl")
    assert "gone.jsonl" in str(err.value)
