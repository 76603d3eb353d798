"""Pass 1 of validation: the per-row facts the GX suites check, in one streaming pass over the file.

Per row, a chunk at a time: whether question and answer are there, the control sequences in user text
(the tokenizer's special and added tokens, the template's markers), the token length of the example as
the base's chat template renders it (tasks/plumbing/chat.py), whether it ends with the end-of-turn token
(or why the template refuses it), and the split (a hash of the question). The whole-file rules keep
compact state, never the rows: exact duplicates through two dicts of 64-bit keys (question, id; the first
occurrence in file order is kept), near-duplicates through the hashed word 3-grams of each candidate,
joined once the pass is done (near_duplicates.py). What a row is kept or dropped for is decided in pass 2,
where the GX row suite sees each chunk with these facts (stage.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.plumbing.chat import ChatError, ChatFormat
from tasks.plumbing.dataio import DatasetReader, dialogue_key
from tasks.stages.validate.near_duplicates import join_shingles, shingle_keys

# Row-level checks, in the order a row is attributed to one of them (the first it fails).
ROW_CHECKS = ("blank", "control_tokens", "too_long", "missing_eos", "duplicate", "near_duplicate")


def key_of(text: str) -> int:
    """A 64-bit key for a text (signed, to sit in an int64 array)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def split_of(question_norm: str, salt: str, eval_fraction: float) -> str:
    """`eval` or `train`, from a hash of the question alone: adding other rows never moves this one."""
    digest = hashlib.sha256(f"{salt}\x00{question_norm}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


@dataclass
class Scan:
    """What pass 1 learnt about every row, by its position in the file (its ordinal), compactly."""

    lines: np.ndarray  # int64: the row's line in the file
    present: np.ndarray  # bool: question and answer are non-blank
    n_tokens: np.ndarray  # float32: tokens of the rendered example, NaN when not rendered
    ends_with_eos: np.ndarray  # bool
    eval_split: np.ndarray  # bool: the row's question hashes into eval
    question_keys: np.ndarray  # int64 (0 without a question)
    answer_keys: np.ndarray  # int64
    id_keys: np.ndarray  # int64
    markers: dict[int, str] = field(default_factory=dict)  # ordinal -> "a, b" control sequences
    template_errors: dict[int, str] = field(default_factory=dict)  # ordinal -> why the template refuses it
    duplicates: dict[int, tuple[int, str]] = field(default_factory=dict)  # ordinal -> (line, question|id)
    near: dict[int, tuple[int, float]] = field(default_factory=dict)  # ordinal -> (line, Jaccard)
    chat: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.lines)


def scan_rows(cfg: Config, reader: DatasetReader, chat: ChatFormat) -> Scan:
    """Pass 1 over `reader`'s file: every row's facts, exact and near duplicates.

    Raises:
        UserError: an unreadable file (from the reader), or more rows than `data.max_rows` (the count
            is read through to the end, holding nothing).
    """
    acc = _Accumulator(cfg, chat)
    over = 0
    with parallel_tokenizer():
        for chunk in reader.chunks():
            if acc.count + len(chunk) > cfg.data.max_rows or over:
                over += len(chunk)  # counted, not kept: memory stays flat however long the file is
                continue
            acc.add(chunk)
    if over:
        raise UserError(
            f"{reader.path}: {acc.count + over} rows, over data.max_rows={cfg.data.max_rows} (check: row_count)"
        )
    return acc.finish()


def user_text(row: dict[str, Any]) -> str:
    """Everything a row's author wrote: system message, earlier turns, question and answer."""
    turns = [t["content"] for t in row.get("history") or ()]
    return "\n".join([row.get("system") or "", *turns, row["question"] or "", row["answer"] or ""])


class _Accumulator:
    """The compact state pass 1 builds chunk by chunk."""

    def __init__(self, cfg: Config, chat: ChatFormat) -> None:
        self.cfg, self.chat = cfg, chat
        self.count = 0
        self.columns: dict[str, list[np.ndarray]] = {}
        self.scan = Scan(*(np.zeros(0) for _ in range(8)), chat=chat.describe())
        self.seen_question: dict[int, int] = {}
        self.seen_id: dict[int, int] = {}
        self.candidates = array("q")  # ordinals of rows near-duplicates are looked for among
        self.shingles = array("q")  # their shingle keys, flat
        self.offsets = array("q", [0])

    def add(self, chunk: list[dict[str, Any]]) -> None:
        start, n = self.count, len(chunk)
        present = np.array(
            [bool((r["question"] or "").strip() and (r["answer"] or "").strip()) for r in chunk]
        )
        for k in np.flatnonzero(present):
            found = self.chat.find_markers(user_text(chunk[k]))
            if found:
                self.scan.markers[start + int(k)] = ", ".join(found)
        n_tokens, eos = self._token_facts(chunk, present, start)
        norms = [
            dialogue_key(r["question"], r.get("history")) if ok else None
            for r, ok in zip(chunk, present, strict=True)
        ]
        d = self.cfg.data
        columns = {
            "lines": np.array([r["line"] for r in chunk], dtype=np.int64),
            "present": present,
            "n_tokens": n_tokens,
            "ends_with_eos": eos,
            "eval_split": np.array(
                [bool(q) and split_of(q, d.split_salt, d.eval_fraction) == "eval" for q in norms]
            ),
            "question_keys": np.array([key_of(q) if q else 0 for q in norms], dtype=np.int64),
            "answer_keys": np.array([key_of(r["answer"] or "") for r in chunk], dtype=np.int64),
            "id_keys": np.array([key_of(r["id"]) for r in chunk], dtype=np.int64),
        }
        for name, values in columns.items():
            self.columns.setdefault(name, []).append(values)
        ok = present & (n_tokens <= self.cfg.train.max_length) & eos
        for k in np.flatnonzero(ok):
            if start + int(k) not in self.scan.markers:
                self._register(start + int(k), norms[k], columns, int(k))
        self.count += n

    def _token_facts(
        self, chunk: list[dict[str, Any]], present: np.ndarray, start: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of each rendered example and whether it ends with the end-of-turn token."""
        texts, rendered = [], []
        for k in np.flatnonzero(present):
            try:
                texts.append(self.chat.example(chunk[k])[0])
                rendered.append(int(k))
            except ChatError as exc:
                self.scan.template_errors[start + int(k)] = str(exc)
        n_tokens = np.full(len(chunk), np.nan, dtype=np.float32)
        eos = np.zeros(len(chunk), dtype=bool)
        for k, ids in zip(rendered, self.chat.token_ids(texts), strict=True):
            n_tokens[k] = len(ids)
            eos[k] = bool(ids) and ids[-1] == self.chat.end_of_turn_id
        return n_tokens, eos

    def _register(self, ordinal: int, norm: str, columns: dict[str, np.ndarray], k: int) -> None:
        """Exact duplicates in file order; a row that is none becomes a near-duplicate candidate."""
        line = int(columns["lines"][k])
        qkey, ikey = int(columns["question_keys"][k]), int(columns["id_keys"][k])
        if qkey in self.seen_question:
            self.scan.duplicates[ordinal] = (self.seen_question[qkey], "question")
        elif ikey in self.seen_id:
            self.scan.duplicates[ordinal] = (self.seen_id[ikey], "id")
        else:
            self.seen_question[qkey] = line
            self.seen_id[ikey] = line
            self.candidates.append(ordinal)
            self.shingles.extend(shingle_keys(norm))
            self.offsets.append(len(self.shingles))

    def finish(self) -> Scan:
        scan = self.scan
        for name, parts in self.columns.items():
            setattr(scan, name, np.concatenate(parts) if parts else np.zeros(0))
        flat, offsets = (
            np.frombuffer(self.shingles, dtype=np.int64),
            np.frombuffer(self.offsets, dtype=np.int64),
        )
        candidates = np.frombuffer(self.candidates, dtype=np.int64)
        for pos, (other, score) in join_shingles(
            flat, offsets, self.cfg.data.near_duplicate_threshold
        ).items():
            scan.near[int(candidates[pos])] = (int(scan.lines[candidates[other]]), score)
        return scan


@contextlib.contextmanager
def parallel_tokenizer() -> Iterator[None]:
    """Let the Rust tokenizer use every core for the duration (tokenization is most of pass 1's time).

    `TOKENIZERS_PARALLELISM=false` (the Makefile's, for forked test workers) would keep it on one
    thread; nothing forks during pass 1, and the setting is restored after it.
    """
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def in_both_splits(keys: np.ndarray, eval_split: np.ndarray) -> np.ndarray:
    """Per row: whether its question key occurs in both splits (the overlap check's column)."""
    import pandas as pd

    frame = pd.DataFrame({"key": keys, "eval": eval_split})
    mixed = frame[frame["key"] != 0].groupby("key")["eval"].nunique()
    return frame["key"].isin(mixed[mixed > 1].index).to_numpy()


def reason(scan: Scan, cfg: Config, check: str, ordinal: int, row: dict[str, Any] | None = None) -> str:
    """Why the row at `ordinal` fails `check`, in words (errors and the drop list name it)."""
    if check == "blank":
        blank = [c for c in ("question", "answer") if not ((row or {}).get(c) or "").strip()]
        return f"{' and '.join(blank) or 'question or answer'} {'is' if len(blank) == 1 else 'are'} empty or null"
    if check == "control_tokens":
        return f"user text contains control sequence(s) {scan.markers.get(ordinal, '?')}"
    if check == "too_long":
        return (
            f"{int(scan.n_tokens[ordinal])} tokens as the chat template renders it, over "
            f"train.max_length={cfg.train.max_length}"
        )
    if check == "missing_eos":
        return scan.template_errors.get(ordinal) or (
            f"the rendered example does not end with the end-of-turn token {scan.chat.get('end_of_turn')}"
        )
    if check == "duplicate":
        line, kind = scan.duplicates[ordinal]
        return f"duplicate {kind} of line {line}"
    if check == "near_duplicate":
        line, score = scan.near[ordinal]
        return (
            f"near-duplicate question of line {line} "
            f"(word 3-gram Jaccard {score:.2f} >= {cfg.data.near_duplicate_threshold})"
        )
    return check
