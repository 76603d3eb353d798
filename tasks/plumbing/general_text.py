"""Held-out general text: what the forgetting rule (stages/evaluate/general.py) scores base and candidate on.

`eval.general_source` names a JSONL or Parquet file with a `text` column. Without it, the embedded tiny
base uses the held-out documents of its pretraining corpus (data/base_corpus.jsonl) that share no 8-word
passage with its training documents nor with the shipped Q&A set (data/qa.jsonl): Python's pydoc topics
quote each other (the `compound` topic holds `try`, `with` and `class` whole) and pdb's docstrings are
Q&A answers, so a held-out tail can be text the base did train on (tests/data/test_general_text.py
proves the selection by hash). The same holds for a copy of the tiny base used as a hub base (its
qa_lora_base.json names the corpus); any other base needs the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.plumbing.tiny_base import META_FILE

RULE = "max_general_ppl_increase"
SHINGLE_WORDS = 8  # a passage this long shared with training text disqualifies a held-out document


def general_documents(cfg: Config) -> tuple[list[str], str] | None:
    """The general texts (at most `eval.general_max_docs`, file order) and where they came from; None when
    the rule is off.

    Raises:
        UserError: the rule is on for a hub base without `eval.general_source`, or the file is unreadable
            (its line or row named).
    """
    if cfg.gate.max_general_ppl_increase is None:
        return None
    n = cfg.eval.general_max_docs
    if cfg.eval.general_source:
        path = cfg.resolve(cfg.eval.general_source)
        return _read_texts(path, cfg.data.max_row_bytes, "eval.general_source")[:n], str(path)
    if built_on_the_corpus(cfg):
        from tasks.plumbing.tiny_corpus import CORPUS_FILE, pretraining_corpus

        train, heldout = pretraining_corpus()
        seen = shingles(text for _, text in train) | _shipped_qa_shingles()
        unseen = [text for _, text in heldout if not shingles([text]) & seen]
        return unseen[:n], f"{CORPUS_FILE.name} (held-out documents never trained on)"
    raise UserError(
        f"eval.general_source: the forgetting rule (gate.{RULE}={cfg.gate.max_general_ppl_increase}) needs "
        "held-out general text for a hub base: a JSONL or Parquet file with a 'text' column (e.g. a slice "
        f"of the base's pretraining-like data), or set gate.{RULE}: null to turn the rule off"
    )


def built_on_the_corpus(cfg: Config) -> bool:
    """The base is the embedded tiny base, or a copy of one (a directory whose qa_lora_base.json names the
    shipped corpus's hash): its pretraining documents, and which of them it never saw, are known."""
    if cfg.base.kind == "tiny":
        return True
    meta = Path(cfg.base.name_or_path) / META_FILE
    if not meta.is_file():
        return False
    from tasks.plumbing.tiny_corpus import corpus_hash, pretraining_corpus

    try:
        recorded = json.loads(meta.read_text(encoding="utf-8")).get("corpus_hash")
    except (OSError, ValueError, AttributeError):
        return False
    train, heldout = pretraining_corpus()
    return recorded == corpus_hash((*train, *heldout))


def replay_documents(cfg: Config) -> tuple[list[str], str] | None:
    """The general text replayed in training (`train.replay_ratio` > 0) and where it came from; None: off.

    Raises:
        UserError: replay is on for a hub base without `train.replay_source`, the file is unreadable, or
            it shares passages with the forgetting rule's documents (the rule would score text the
            candidate trained on).
    """
    t = cfg.train
    if t.replay_ratio == 0:
        return None
    if t.replay_source:
        path = cfg.resolve(t.replay_source)
        texts, source = _read_texts(path, cfg.data.max_row_bytes, "train.replay_source"), str(path)
    elif built_on_the_corpus(cfg):
        from tasks.plumbing.tiny_corpus import CORPUS_FILE, pretraining_corpus

        texts, source = (
            [text for _, text in pretraining_corpus()[0]],
            f"{CORPUS_FILE.name} (pretraining documents)",
        )
    else:
        raise UserError(
            f"train.replay_source: train.replay_ratio={t.replay_ratio} replays general text, which a hub base "
            "needs as a JSONL or Parquet file with a 'text' column, or set train.replay_ratio: 0"
        )
    try:
        general = general_documents(cfg)
    except UserError:
        general = None  # its own error; validate reports both
    if general is not None and shingles(general[0]) & shingles(texts):
        raise UserError(
            f"train.replay_source: {source} shares passages with the forgetting rule's documents "
            f"({general[1]}): the rule would score text the candidate trained on; use disjoint files"
        )
    return texts, source


def _shipped_qa_shingles() -> set[int]:
    """Passages of the shipped Q&A set (data/qa.jsonl), the SFT data the embedded default trains on."""
    from tasks.core.config import REPO_ROOT

    with (REPO_ROOT / "data" / "qa.jsonl").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return shingles(row[key] for row in rows for key in ("question", "answer"))


def shingles(texts: Iterable[str]) -> set[int]:
    """Hashes of every run of SHINGLE_WORDS whitespace-separated words in `texts`."""
    out: set[int] = set()
    for text in texts:
        words = text.split()
        for i in range(len(words) - SHINGLE_WORDS + 1):
            digest = hashlib.blake2b(" ".join(words[i : i + SHINGLE_WORDS]).encode(), digest_size=8)
            out.add(int.from_bytes(digest.digest(), "little"))
    return out


def _read_texts(path: Path, max_row_bytes: int, key: str) -> list[str]:
    """The `text` of every row of a JSONL or Parquet file, read and checked as the Q&A data is
    (readers.py: encoding, JSON per line, data.max_row_bytes).

    Raises:
        UserError: a missing file, another format, an unreadable row, a row without a non-empty `text`.
    """
    from tasks.plumbing.readers import JSONL_ORDER, Problems, jsonl_records, parquet_records

    if not path.is_file():
        raise UserError(f"{path}: {key} not found (expected a JSONL or Parquet file)")
    if path.suffix not in (".jsonl", ".ndjson", ".parquet"):
        raise UserError(f"{path}: {key} must be .jsonl or .parquet, got {path.suffix!r}")
    problems = Problems(path)
    read = parquet_records if path.suffix == ".parquet" else jsonl_records
    texts = []
    for line, row in read(path, max_row_bytes, problems):
        text = row.get("text")
        if isinstance(text, str) and text.strip():
            texts.append(text)
        else:
            problems.add("text", line, "expected a non-empty string 'text'")
    problems.raise_first((*JSONL_ORDER, "text"))
    if not texts:
        raise UserError(f"{path}: no texts ({key})")
    return texts


def texts_digest(texts: Sequence[str]) -> str:
    """What decides cached document losses: the texts themselves."""
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
