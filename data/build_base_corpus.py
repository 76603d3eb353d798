"""Build the tiny base's pretraining corpus (data/base_corpus.jsonl) from prose that ships with Python.

The corpus is the language reference (`pydoc_data.topics`) plus the *module-level* docstrings of the
standard library, read with `ast` (no imports, no side effects). Function, class and method docstrings
are NOT used: the Q&A dataset (data/qa.jsonl) is built from those, and its eval split must not leak into
pretraining. The tail (~5%, at a paragraph boundary) of every language-reference topic is held out for
the base's perplexity.

The file is committed, and `qa-lora base` reads it instead of the running interpreter: two Python builds
of the same release ship different docs (Debian's 3.11.2 and pyenv's 3.11.7 gave bases whose Q&A scores
differed enough to turn a decisive test gate into a coin flip), so a base built from the interpreter
depended on the machine. Regenerating is only reproducible with GENERATED_WITH (see data/README.md).

    .venv/bin/python data/build_base_corpus.py                # writes data/base_corpus.jsonl
    .venv/bin/python data/build_base_corpus.py --out /tmp/base_corpus.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import re
import sys
import sysconfig
from pathlib import Path

from tasks.core.artifacts import write_text_atomic

# The Python release the committed data/base_corpus.jsonl was generated with (docs differ by release and build).
GENERATED_WITH = "3.11.7"
HELDOUT_FRACTION = 0.05  # tail share of each language-reference topic kept for perplexity
# Stdlib parts whose module docstrings are not prose about Python (tests, IDLE, demos, vendored code).
SKIP_PARTS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"})


def build_documents() -> list[dict[str, str]]:
    """Every document as {"name", "split", "text"}: topics first (train part, then held-out tail), then modules.

    Returns:
        Rows sorted by name within each source; `split` is "train" or "heldout".
    """
    import pydoc_data.topics

    rows: list[dict[str, str]] = []
    for name in sorted(pydoc_data.topics.topics):
        head, tail = split_tail(clean(pydoc_data.topics.topics[name]), HELDOUT_FRACTION)
        rows.append({"name": f"topics/{name}", "split": "train", "text": head})
        if tail:
            rows.append({"name": f"topics/{name}", "split": "heldout", "text": tail})
    rows += [{"name": name, "split": "train", "text": text} for name, text in module_docstrings()]
    return rows


def module_docstrings() -> list[tuple[str, str]]:
    """(name, prose) of every stdlib module docstring of at least 200 characters, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS.intersection(rel.parts):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        if not doc:
            continue
        # Indented lines in module docstrings are mostly API listings ("match  Match a regular
        # expression...") that paraphrase function docstrings, i.e. the Q&A answers: keep prose only.
        prose = clean("\n".join(line for line in doc.splitlines() if not line[:1].isspace()))
        if len(prose) >= 200:
            docs.append((f"stdlib/{rel.as_posix()}", prose))
    return docs


def clean(text: str) -> str:
    """Strip trailing blanks, normalise line ends, collapse runs of blank lines."""
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """Split at the paragraph boundary nearest to (1 - fraction) of the text; short texts stay whole."""
    if len(text) < 2000:
        return text, ""
    target = int(len(text) * (1 - fraction))
    cut = text.rfind("\n\n", 0, target)
    if cut <= 0:
        cut = text.rfind("\n", 0, target)
    if cut <= 0:
        return text, ""
    return text[:cut].strip(), text[cut:].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the tiny base's pretraining corpus from Python's bundled docs "
        f"(reproducible byte for byte with Python {GENERATED_WITH}).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "base_corpus.jsonl",
        help="output JSONL path (default: data/base_corpus.jsonl next to this script)",
    )
    args = parser.parse_args(argv)
    if platform.python_version() != GENERATED_WITH:
        print(
            f"warning: Python {platform.python_version()} differs from {GENERATED_WITH}: "
            "its docs differ, so the output will not match the committed file",
            file=sys.stderr,
        )
    rows = build_documents()
    write_text_atomic(args.out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} documents to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
