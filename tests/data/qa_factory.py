"""Row and file builders shared by the data tests (imported by name: tests/ has no packages), and the
loader of the data/ build scripts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any


def load_script(path: Path) -> ModuleType:
    """A data/ build script as a module (data/ is not a package: loaded by path, as `python PATH` would)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
