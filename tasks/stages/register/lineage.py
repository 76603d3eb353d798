"""What a registration needs from the run directory: complete inputs, and the lineage tags of the version.

Pipeline run id (the idempotence key): `<run_dir name>-<first 12 hex of the adapter weights' sha256>`.
The DAG's run_dir is `runs/<dag run id>`, so an Airflow retry maps to the same version, while a new
`qa-lora run` into the same `runs/local` (new weights) is a new version instead of a stale match.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json, sha256
from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout
from tasks.core.redact import redact
from tasks.plumbing.registry import RUN_ID_TAG, TAG, check_tree_parts, require_file


def optional_reports(layout: RunLayout) -> dict[Path, str]:
    """Reports logged when present (listed as missing in registration.json otherwise): path -> name."""
    return {
        layout.train_summary: "train_summary.json",
        layout.data_quality: "data_quality.json",
        layout.effective_params: "params.effective.yaml",
    }


def check_inputs(layout: RunLayout) -> None:
    """Refuse (UserError naming the path) unless every required artifact is there and complete.

    Raises:
        UserError: a required file is missing or empty, version.json has no dataset hash, or the adapter,
            merged model or ONNX export is incomplete (nothing is registered).
    """
    for path in (layout.eval_metrics, layout.version_file, layout.export_summary, layout.model_card):
        require_file(path, "a required artifact (nothing registered)")
    dataset_hash = read_json(layout.version_file).get("dataset_hash")
    if not isinstance(dataset_hash, str) or not dataset_hash:
        raise UserError(
            f"{layout.version_file}: 'dataset_hash' must be a non-empty string (nothing registered)"
        )
    check_tree_parts(layout.adapter_dir, layout.merged_dir, layout.onnx_dir)


def build_lineage(cfg: Config, layout: RunLayout, gate: dict[str, Any]) -> dict[str, str]:
    """The version's tags (all strings: MLflow tags are strings; credentials redacted).

    Args:
        cfg: the run's configuration.
        layout: the run directory's paths.
        gate: the gate decision (read_gate's object).

    Returns:
        Tag name -> value, including the pipeline run id under `qa_lora.run_id`.
    """
    adapter_sha = sha256(layout.adapter_dir / "adapter_model.safetensors")
    commit, dirty = git_state()
    tags = {
        # Sanitised: it goes inside quoted MLflow search filters (DAG run ids hold ':' and '+').
        RUN_ID_TAG: re.sub(r"[^A-Za-z0-9._:+-]", "_", layout.root.name) + f"-{adapter_sha[:12]}",
        f"{TAG}run_dir": str(layout.root),
        f"{TAG}dataset_hash": str(read_json(layout.version_file)["dataset_hash"]),
        f"{TAG}git_commit": commit,
        f"{TAG}git_dirty": dirty,
        f"{TAG}params_hash": cfg.params_hash(),
        f"{TAG}base_model": cfg.base.name_or_path,
        f"{TAG}base_revision": cfg.base.revision or "",
        f"{TAG}adapter_sha256": adapter_sha,
        f"{TAG}chat_fingerprint": str(_export_chat(layout).get("fingerprint", "")),
        f"{TAG}chat_template": str(_export_chat(layout).get("template", "")),
        f"{TAG}gate.decision": str(gate.get("decision", "pass")),
        f"{TAG}gate.primary_metric": str(gate.get("primary_metric", cfg.gate.primary_metric)),
        f"{TAG}gate.champion_version": norm_version(gate.get("champion_version")) or "none",
    }
    for key, value in key_metrics(gate).items():
        tags[f"{TAG}metric.{key}"] = f"{value:.6g}"
    for key, value in serving_figures(layout).items():
        tags[f"{TAG}serving.{key}"] = f"{value:.6g}"
    return {key: redact(value) for key, value in tags.items()}


def _export_chat(layout: RunLayout) -> dict[str, Any]:
    """The chat format the export recorded (export_summary.json `chat`), or {}."""
    summary = read_json(layout.export_summary) if layout.export_summary.is_file() else {}
    return summary.get("chat") or {}


def key_metrics(gate: dict[str, Any]) -> dict[str, float]:
    """The candidate's top-level numbers from gate.json (a {"mean": x} style entry counts as x), and the
    forgetting rule's value when the rule ran (`general_ppl_increase`), and per harness task its headline
    metric (`harness_<task>_<metric>`) with the change from the base (`..._change`)."""
    candidate = (gate.get("metrics") or {}).get("candidate") or {}
    out: dict[str, float] = {}
    for key, value in candidate.items() if isinstance(candidate, dict) else ():
        if isinstance(value, dict):
            value = next((value[k] for k in ("mean", "value", "point") if k in value), None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[str(key)] = float(value)
    for rule in gate.get("rules") or ():
        if rule.get("name") == "max_general_ppl_increase" and isinstance(rule.get("value"), int | float):
            out["general_ppl_increase"] = float(rule["value"])
        if rule.get("name") == "max_harness_regression":
            for task, t in (rule.get("tasks") or {}).items():
                out[f"harness_{task}_{t['metric']}"] = float(t["candidate"])
                out[f"harness_{task}_{t['metric']}_change"] = float(t["change"])
    return out


def serving_figures(layout: RunLayout) -> dict[str, float]:
    """The candidate's serving cost as the export measured it (export_summary.json), numbers only."""
    summary = read_json(layout.export_summary) if layout.export_summary.is_file() else {}
    candidate = (summary.get("serving") or {}).get("candidate") or {}
    return {
        key: float(value)
        for key, value in candidate.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def git_state() -> tuple[str, str]:
    """(commit, "true"/"false" dirty) of the repository; ("unknown", "unknown") outside git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    if commit.returncode != 0:
        return "unknown", "unknown"
    return commit.stdout.strip(), str(bool(status.stdout.strip())).lower()


def norm_version(value: Any) -> str | None:
    """A version number as a string, or None for a missing/"none"/"null" value."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    return str(value).strip()
