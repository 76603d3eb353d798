"""Row and file builders shared by the data tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def qa_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """n distinct, valid Q&A rows (distinct enough that no two are near-duplicates)."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    rows = []
    for i in range(start, start + n):
        a, b, c = words[i % 10], words[(i // 10) % 10], words[(i // 100) % 10]
        rows.append(
            {
                "id": f"q{i}",
                "question": f"Question {i}: how does {a} relate to {b} and {c}?",
                "answer": f"{a.title()} relates to {b} by rule {i}.",
                "category": "cat-even" if i % 2 == 0 else "cat-odd",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
