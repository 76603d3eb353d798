"""The registry's share of retention: versions whose run directory is deleted go, with their artifacts.

A version is deleted only when no alias points at it (champion, candidate, previous or any other) and
the run directory it was registered from (its `qa_lora.run_dir` tag) lies under the runs root being
pruned and is not kept. The MLflow run that produced it stays, with its metrics, parameters and lineage
tags (the audit trail), tagged `qa_lora.artifacts_deleted`; its artifact tree is deleted through MLflow's
artifact repository, so a server or S3 artifact store is pruned like a local one. Each deletion is a
line in the registered model's audit log.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.plumbing.registry import TAG
from tasks.plumbing.tracking import setup_mlflow
from tasks.stages.register.champion import audit, registry_lock

log = logging.getLogger("qa_lora.register")


def prune_versions(
    cfg: Config, root: Path, keep: set[Path], *, dry_run: bool = False
) -> list[dict[str, Any]]:
    """Delete the versions registered from run directories under `root` that are not in `keep`.

    Args:
        cfg: the configuration (`register` section).
        root: the runs root being pruned; versions from run directories elsewhere are never touched.
        keep: the run directories that stay.
        dry_run: list, delete nothing.

    Returns:
        One {"version", "run_dir", "bytes"} per version deleted (or that would be).
    """
    setup_mlflow(cfg)
    from mlflow import MlflowClient

    client, name = MlflowClient(), cfg.register.model_name
    if not client.search_registered_models(f"name = '{name}'"):
        return []
    gone: list[dict[str, Any]] = []
    with registry_lock(cfg):
        aliased = set(client.get_registered_model(name).aliases.values())
        for mv in client.search_model_versions(f"name = '{name}'"):
            run_dir = Path(mv.tags.get(f"{TAG}run_dir") or "/").resolve()
            if str(mv.version) in aliased or not run_dir.is_relative_to(root) or run_dir in keep:
                continue
            gone.append({"version": str(mv.version), "run_dir": str(run_dir), "bytes": _bytes(mv.source)})
            if not dry_run:
                _delete(client, name, mv)
    return gone


def _delete(client: Any, name: str, mv: Any) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    get_artifact_repository(mv.source).delete_artifacts()
    if mv.run_id:
        client.set_tag(mv.run_id, f"{TAG}artifacts_deleted", f"{now} with version {mv.version} (retention)")
    client.delete_model_version(name, mv.version)
    audit(
        client,
        name,
        f"{now} delete v{mv.version} by retention: its run {mv.tags.get(f'{TAG}run_id')} was pruned",
    )
    log.info("deleted version %s of %r and its artifacts", mv.version, name)


def _bytes(source: str) -> int:
    """The size of a version's artifact tree, listed through MLflow's artifact repository."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(source)

    def walk(path: str | None) -> int:
        return sum(walk(f.path) if f.is_dir else (f.file_size or 0) for f in repo.list_artifacts(path))

    return walk(None)
