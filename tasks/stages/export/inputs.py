"""Inputs, fingerprint and reuse, and the small result the stage returns.

A re-run whose inputs and export params are unchanged (same fingerprint) keeps the existing export.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json
from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout
from tasks.plumbing.onnx_generate import LAYOUT_FILE
from tasks.plumbing.splits import eval_sample
from tasks.stages.export.onnx_graph import ONNX_GRAPH

# Bump when a change here changes what an export contains: a stored export made by older code is redone.
# 2: the provider that really loaded (and any CPU fallback) is recorded; the gate is required.
CODE_VERSION = "2"


def check_inputs(layout: RunLayout) -> None:
    """Refuse a run without a trained adapter or an eval split (one line naming the stage to run)."""
    for need, what in (
        (layout.adapter_dir / "adapter_config.json", "run `qa-lora train` first"),
        (layout.eval_split, "run `qa-lora validate` first"),
    ):
        if not need.is_file():
            raise UserError(f"{need}: not found; {what}")


def parity_questions(path: Path, n: int) -> list[str]:
    """The first `n` eval questions in id order (stable across runs)."""
    return [r["question"] for r in eval_sample(path, n)]


def export_fingerprint(cfg: Config, layout: RunLayout, base_src: str, questions: Sequence[str]) -> str:
    """What decides the export's content: code, the whole effective config (the card quotes it), base,
    adapter bytes, parity prompts, and the lineage files the model card reads."""
    h = hashlib.sha256()
    h.update(json.dumps([CODE_VERSION, base_src, cfg.params_hash(), list(questions)]).encode())
    base = Path(base_src)
    if base.is_dir():  # a rebuilt base (new mtime) means a new export; hashing GBs of weights would be slow
        for f in sorted(base.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    files = sorted(f for f in layout.adapter_dir.iterdir() if f.is_file())
    files += [layout.version_file, layout.eval_metrics, layout.gate_file]
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest() if f.is_file() else b"missing")
    return h.hexdigest()[:16]


def reusable_summary(layout: RunLayout, fingerprint: str) -> dict[str, Any] | None:
    """The existing export's summary when it is complete and has this fingerprint; else None."""
    try:
        summary = read_json(layout.export_summary)
    except (OSError, ValueError):
        return None
    needed = [
        layout.merged_dir / "config.json",
        layout.onnx_dir / ONNX_GRAPH,
        layout.onnx_dir / LAYOUT_FILE,
        layout.model_card,
    ]
    if not isinstance(summary, dict) or summary.get("fingerprint") != fingerprint:
        return None
    return summary if all(p.is_file() for p in needed) else None


def export_result(layout: RunLayout, summary: Mapping[str, Any], reused: bool) -> dict[str, Any]:
    """The stage's small JSON result (paths, provider, parity headline, variants, reuse)."""
    onnx_p = summary["parity"]["onnx"]
    return {
        "export_dir": str(layout.export_dir),
        "merged_dir": str(layout.merged_dir),
        "onnx_dir": str(layout.onnx_dir),
        "model_card": str(layout.model_card),
        "summary": str(layout.export_summary),
        "fingerprint": summary["fingerprint"],
        "provider": summary["provider"]["name"],
        "cpu_fallback": summary["provider"].get("cpu_fallback"),
        "onnx_max_abs_diff": onnx_p["max_abs_diff"],
        "tokens_identical": onnx_p["tokens_identical"],
        "variants": {k: v["passed"] for k, v in (summary.get("variants") or {}).items()},
        "reused": reused,
    }


def versions() -> dict[str, str]:
    """Python and the versions of the libraries (and the ONNX Runtime distribution) the export used."""
    import importlib.metadata as md

    from tasks.plumbing.ort_runtime import installed_runtimes

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "onnx", "onnxscript"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    out.update(dict(installed_runtimes()))
    return out


def dir_size(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
