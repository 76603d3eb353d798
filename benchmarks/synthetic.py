"""Synthetic Q&A files of any size: distinct rows of realistic length (~330 bytes), deterministic.

For the scale figure (benchmarks/scale.py) and the memory-growth test (tests/data/test_scale.py).
Questions draw a dozen words from a 20,000-word made-up vocabulary, so no two rows are duplicates or
near-duplicates by chance and validation keeps them all; `bad_line` plants a malformed JSON line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "do", "fi", "gu", "ho", "je")


def _vocabulary(size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def write_rows(path: Path, rows: int, seed: int = 0, bad_line: int | None = None) -> Path:
    """Write `rows` JSONL Q&A rows to `path` (line `bad_line`, 1-based, malformed when given)."""
    rng = random.Random(seed)
    vocab = _vocabulary(20_000, seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(1, rows + 1):
            if i == bad_line:
                handle.write('{"question": "a truncated row", "answer": \n')
                continue
            q = " ".join(rng.choices(vocab, k=12))
            a = " ".join(rng.choices(vocab, k=22))
            row = {
                "id": f"s{i}",
                "question": f"What does {q} do?",
                "answer": f"It {a}.",
                "category": f"c{i % 50}",
            }
            handle.write(json.dumps(row) + "\n")
    return path
