"""Build the bundled Q&A dataset (data/qa.jsonl) from the Python standard library's API docstrings.

Every row pairs a question about one stdlib function, class or method ("What does json.dumps do?")
with the summary of its docstring (the first paragraph, whitespace normalized, cut at a sentence
boundary near MAX_ANSWER_WORDS). The text is real, written by CPython's authors, and nobody wrote
the pairs by hand, so the pipeline trains and evaluates on something with structure.

The output is deterministic for a given Python release: modules come from a fixed allowlist,
names and rows are sorted, question templates are chosen by a hash of the qualified name, and
nothing depends on the environment, cwd, time or dict/set order. Docstrings change between Python
releases, so the committed file is only reproducible with GENERATED_WITH (see data/README.md).

    .venv/bin/python data/build_qa_dataset.py                # writes data/qa.jsonl
    .venv/bin/python data/build_qa_dataset.py --out /tmp/qa.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import platform
import re
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

# The Python release the committed data/qa.jsonl was generated with (docstrings differ between releases).
GENERATED_WITH = "3.11.7"

# Pure-Python stdlib modules without import side effects, GUI or platform-specific contents (so the
# output does not depend on the OS). Submodules are listed explicitly; the category is the top-level name.
MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bdb",
    "bisect",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "collections",
    "collections.abc",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.charset",
    "email.generator",
    "email.headerregistry",
    "email.message",
    "email.parser",
    "email.policy",
    "email.utils",
    "enum",
    "fileinput",
    "fractions",
    "ftplib",
    "functools",
    "graphlib",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib.abc",
    "importlib.metadata",
    "importlib.resources",
    "importlib.util",
    "inspect",
    "ipaddress",
    "json",
    "json.encoder",
    "logging",
    "logging.handlers",
    "mailbox",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "pathlib",
    "pdb",
    "pickle",
    "platform",
    "pkgutil",
    "poplib",
    "pprint",
    "pstats",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "shlex",
    "smtplib",
    "socketserver",
    "statistics",
    "struct",
    "symtable",
    "tarfile",
    "textwrap",
    "threading",
    "timeit",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest",
    "unittest.mock",
    "urllib.parse",
    "urllib.robotparser",
    "uuid",
    "warnings",
    "weakref",
    "wsgiref.handlers",
    "wsgiref.headers",
    "wsgiref.util",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xml.sax.handler",
    "xml.sax.saxutils",
    "xmlrpc.client",
    "xmlrpc.server",
    "zipfile",
    "zoneinfo",
)

# Answers keep whole sentences up to this many words; a single longer first sentence is cut to it.
MAX_ANSWER_WORDS = 60

FUNCTION_TEMPLATES: tuple[str, ...] = (
    "What does {qual}() do?",
    "What is the purpose of the function {qual}?",
    "In Python's {module} module, what does {name}() do?",
    "Describe the function {qual}.",
    "What is {qual}() used for?",
)
CLASS_TEMPLATES: tuple[str, ...] = (
    "What is {qual}?",
    "What does the class {qual} represent?",
    "In Python's {module} module, what is the {name} class?",
    "Describe the class {qual}.",
    "What is the {qual} class used for?",
)
METHOD_TEMPLATES: tuple[str, ...] = (
    "What does {qual}() do?",
    "What does the {name}() method of {owner} do?",
    "In Python's {module} module, what does the method {owner_name}.{name}() do?",
    "Describe the method {qual}.",
    "What is {qual}() used for?",
)

# A leading paragraph that is only a call signature, as C functions write it ("reduce(f, it) -> value").
_SIGNATURE_RE = re.compile(r"^[\w.]+\(.*\)(\s*-+>\s*.*)?$", re.DOTALL)
# A sentence ends with . ! or ? followed by whitespace and an upper-case letter, a quote or a bracket.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(\[])")


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def first_paragraph(doc: str) -> str:
    """First paragraph of a docstring (a bare signature paragraph skipped), whitespace normalized."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(doc))]
    paragraphs = [p for p in paragraphs if p]
    if len(paragraphs) > 1 and _SIGNATURE_RE.match(paragraphs[0]):
        paragraphs = paragraphs[1:]
    return paragraphs[0] if paragraphs else ""


def _is_bare_signature(summary: str, name: str) -> bool:
    """True for generated, prose-free summaries: the bare name, `Name(fields)` (namedtuples, AST
    nodes' ASDL grammar) or `name = Alt(...) | ...` (abstract AST nodes). They teach nothing."""
    return re.fullmatch(rf"{re.escape(name)}(\(.*\)| = .*)?", summary) is not None


def cap_words(text: str, max_words: int = MAX_ANSWER_WORDS) -> str:
    """Keep whole sentences while they fit max_words; cut a longer first sentence at max_words."""
    if len(text.split()) <= max_words:
        return text
    kept: list[str] = []
    count = 0
    for sentence in _SENTENCE_END_RE.split(text):
        words = len(sentence.split())
        if count + words > max_words:
            break
        kept.append(sentence)
        count += words
    if kept:
        return " ".join(kept)
    return " ".join(text.split()[:max_words]) + " ..."


def _public_names(module: object) -> list[str]:
    """Names a module declares as its API: __all__ when it has one, else public names defined in it."""
    declared = getattr(module, "__all__", None)
    if declared is not None:
        return sorted({name for name in declared if not name.startswith("_")})
    own = {module.__name__, "_" + module.__name__.rsplit(".", 1)[-1]}  # C accelerators: _heapq, _json
    return sorted(
        name
        for name, obj in vars(module).items()
        if not name.startswith("_") and getattr(obj, "__module__", None) in own
    )


def _own_doc(obj: object) -> str | None:
    """The object's own docstring (not inherited, unlike inspect.getdoc)."""
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _iter_entries(module_name: str) -> Iterator[tuple[str, str, str, str, str]]:
    """(kind, qualified name, short name, owner, docstring) for a module's functions, classes, methods."""
    module = importlib.import_module(module_name)
    for name in _public_names(module):
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) == "builtins":
            continue  # a re-exported builtin (typing.Text is str): its docs belong to no stdlib module
        qual = f"{module_name}.{name}"
        if inspect.isclass(obj):
            doc = _own_doc(obj)
            if doc is not None:
                yield "class", qual, name, "", doc
            for attr in sorted(vars(obj)):
                if attr.startswith("_"):
                    continue
                member = vars(obj)[attr]
                if isinstance(member, staticmethod | classmethod):
                    member = member.__func__
                if not inspect.isroutine(member):
                    continue
                doc = _own_doc(member)
                if doc is not None:
                    yield "method", f"{qual}.{attr}", attr, name, doc
        elif inspect.isroutine(obj):
            doc = _own_doc(obj)
            if doc is not None:
                yield "function", qual, name, "", doc


def _question(kind: str, qual: str, name: str, owner: str, module_name: str) -> str:
    templates = {"function": FUNCTION_TEMPLATES, "class": CLASS_TEMPLATES, "method": METHOD_TEMPLATES}[kind]
    # A hash of the qualified name picks the phrasing: stable across runs, varied across rows.
    template = templates[int(_stable_hash("template:" + qual)[:8], 16) % len(templates)]
    return template.format(
        qual=qual,
        name=name,
        module=module_name,
        owner=f"{module_name}.{owner}",
        owner_name=owner,
    )


def _check_environment() -> None:
    if sys.flags.optimize >= 2:
        raise SystemExit("error: docstrings are stripped under -OO / PYTHONOPTIMIZE=2; run without it")


def _check_stdlib(module_name: str) -> None:
    """Refuse a module shadowed by a same-named file outside the standard library (PYTHONPATH, cwd)."""
    module = sys.modules[module_name]
    path = getattr(module, "__file__", None)
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    if path is not None and stdlib not in Path(path).resolve().parents:
        raise SystemExit(f"error: module {module_name} comes from {path}, not the standard library {stdlib}")


def build_rows() -> list[dict[str, str]]:
    """All Q&A rows, sorted by qualified name, in the fixed field order id, question, answer, category.

    Returns:
        The rows as dicts; ids are the first 12 hex digits of the SHA-256 of the qualified name.
    """
    _check_environment()
    seen: dict[str, dict[str, str]] = {}
    for module_name in sorted(MODULES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a deprecation notice on import must not change the output
            entries = list(_iter_entries(module_name))
        _check_stdlib(module_name)
        for kind, qual, name, owner, doc in entries:
            summary = first_paragraph(doc)
            if qual in seen or _is_bare_signature(summary, name):
                continue
            seen[qual] = {
                "id": _stable_hash(qual)[:12],
                "question": _question(kind, qual, name, owner, module_name),
                "answer": cap_words(summary),
                "category": module_name.split(".", 1)[0],
            }
    return [seen[qual] for qual in sorted(seen)]


def write_jsonl(rows: list[dict[str, str]], out: Path) -> None:
    """Write rows as UTF-8 JSONL (LF line endings, trailing newline) atomically.

    Args:
        rows: Rows from build_rows().
        out: Destination file; written to a temporary sibling, then renamed into place.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data file is meant to be shared and committed
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the Q&A dataset from Python standard library docstrings "
        f"(reproducible byte for byte with Python {GENERATED_WITH}).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "qa.jsonl",
        help="output JSONL path (default: data/qa.jsonl next to this script)",
    )
    args = parser.parse_args(argv)
    if platform.python_version() != GENERATED_WITH:
        print(
            f"warning: Python {platform.python_version()} differs from {GENERATED_WITH}: "
            "docstrings differ between releases, so the output will not match the committed file",
            file=sys.stderr,
        )
    rows = build_rows()
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
