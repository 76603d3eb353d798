"""Retention: keep the runs root, the registry and the DVC cache within `runtime.keep_runs` / `keep_gb`.

The plan is decided here, from the run directories under the runs root (the parent of this run's
directory) and the registry's aliases; each store's owner deletes its share: the register stage the
versions registered from deleted runs (`prune_versions`), the version stage the DVC cache objects only
they used (`prune_snapshots`; the remote keeps every snapshot). Never deleted: this run, a run written
to within `busy_hours` (in progress), the run of any aliased version (champion, candidate, previous),
outputs `dvc.yaml` tracks (runs/dvc). A run directory is renamed out of the way before it is deleted,
so a crash mid-delete leaves no half run that looks whole.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json
from tasks.core.config import REPO_ROOT, Config
from tasks.core.layout import EFFECTIVE_PARAMS

log = logging.getLogger("qa_lora.retention")

GB = 1024**3


def collect_garbage(cfg: Config, run_dir: Path, *, dry_run: bool = False) -> dict[str, Any]:
    """Delete what retention allows under run_dir's parent, the registry and the DVC cache.

    Args:
        cfg: the configuration (`runtime.keep_runs`, `keep_gb`, `busy_hours`; `register`; `data`).
        run_dir: this run's directory (never deleted); its parent is the runs root.
        dry_run: list what would go and the bytes freed, delete nothing.

    Returns:
        {"runs_root", "kept": [{"run_dir", "reason"}], "deleted": [{"run_dir", "bytes"}], "versions":
        [{"version", "run_dir", "bytes"}], "dvc_cache": {"objects", "bytes"}, "bytes_freed", "dry_run"}.
    """
    from tasks.stages.register import prune_versions
    from tasks.stages.version import prune_snapshots

    run_dir = Path(run_dir).resolve()
    root = run_dir.parent
    kept, doomed = plan(cfg, run_dir)
    keep = {Path(k["run_dir"]) for k in kept}
    drop_hashes, keep_hashes = _hashes(p for p, _ in doomed), _hashes(keep)  # before the runs go
    versions = prune_versions(cfg, root, keep, dry_run=dry_run)
    deleted = [{"run_dir": str(path), "bytes": size} for path, size in doomed]
    if not dry_run:
        for path, _ in doomed:
            _delete_run(path)
    snapshots = prune_snapshots(cfg, drop_hashes, keep_hashes, dry_run=dry_run)
    freed = sum(d["bytes"] for d in deleted) + sum(v["bytes"] for v in versions) + snapshots["bytes"]
    verb = "would free" if dry_run else "freed"
    for item in (*deleted, *versions):
        what = f"version {item['version']} of {cfg.register.model_name}" if "version" in item else "run"
        log.info(
            "%s %s %s (%.1f MiB)",
            "would delete" if dry_run else "deleted",
            what,
            item["run_dir"],
            item["bytes"] / 2**20,
        )
    log.info(
        "retention: %d run(s) kept, %d deleted, %d registry version(s), %d DVC object(s): %s %.1f MiB",
        len(kept), len(deleted), len(versions), snapshots["objects"], verb, freed / 2**20,
    )  # fmt: skip
    return {
        "runs_root": str(root),
        "kept": kept,
        "deleted": deleted,
        "versions": versions,
        "dvc_cache": snapshots,
        "bytes_freed": freed,
        "dry_run": dry_run,
    }


def plan(cfg: Config, run_dir: Path) -> tuple[list[dict[str, str]], list[tuple[Path, int]]]:
    """(kept run directories with the reason, (run directory, bytes) to delete), newest first."""
    run_dir = Path(run_dir).resolve()
    runs = sorted(
        (p for p in run_dir.parent.iterdir() if (p / EFFECTIVE_PARAMS).is_file()),
        key=lambda p: (p / EFFECTIVE_PARAMS).stat().st_mtime,
        reverse=True,
    )
    protected = _protected(cfg, run_dir)
    kept: list[dict[str, str]] = []
    candidates: list[tuple[Path, int]] = []
    used = 0  # bytes of the runs kept so far
    busy_since = time.time() - cfg.runtime.busy_hours * 3600
    for path in runs:
        size, newest = _walk(path)
        reason = protected.get(path) or ("in progress" if newest >= busy_since else None)
        if reason:
            kept.append({"run_dir": str(path), "reason": reason})
            used += size
        else:
            candidates.append((path, size))
    n = cfg.runtime.keep_runs - len(kept) if cfg.runtime.keep_runs is not None else len(candidates)
    budget = cfg.runtime.keep_gb * GB if cfg.runtime.keep_gb is not None else float("inf")
    doomed = [(p, _walk(p)[0]) for p in run_dir.parent.glob(".deleting-*")]  # an interrupted delete
    for i, (path, size) in enumerate(candidates):
        if i < n and used + size <= budget:
            kept.append({"run_dir": str(path), "reason": f"among the newest {cfg.runtime.keep_runs}"})
            used += size
        else:
            doomed.append((path, size))
    return kept, doomed


def _protected(cfg: Config, run_dir: Path) -> dict[Path, str]:
    """Run directories that stay whatever the budget: this run, aliased versions' runs, dvc.yaml outputs."""
    from tasks.plumbing.registry import TAG
    from tasks.plumbing.tracking import setup_mlflow

    out = {run_dir: "this run"}
    setup_mlflow(cfg)
    from mlflow import MlflowClient

    client, name = MlflowClient(), cfg.register.model_name
    if client.search_registered_models(f"name = '{name}'"):
        for alias, version in client.get_registered_model(name).aliases.items():
            tag = client.get_model_version(name, version).tags.get(f"{TAG}run_dir")
            if tag:
                out.setdefault(Path(tag).resolve(), f"{alias} (version {version})")
    out.setdefault((REPO_ROOT / "runs" / "dvc").resolve(), "dvc.yaml's outputs (`dvc repro`)")
    return out


def _walk(path: Path) -> tuple[int, float]:
    """(bytes, newest modification time) of a directory tree; links are not followed."""
    size, newest = 0, path.stat().st_mtime
    for file in path.rglob("*"):
        st = file.lstat()
        size += st.st_size if file.is_file() and not file.is_symlink() else 0
        newest = max(newest, st.st_mtime)
    return size, newest


def _hashes(run_dirs: Any) -> set[str]:
    """The dataset hashes the runs' version.json name."""
    out = set()
    for run_dir in run_dirs:
        version = Path(run_dir) / "version.json"
        if version.is_file() and isinstance(value := read_json(version).get("dataset_hash"), str):
            out.add(value)
    return out


def _delete_run(path: Path) -> None:
    """Rename out of the run namespace first, then delete: a crash leaves `.deleting-*`, never a half run."""
    trash = path if path.name.startswith(".deleting-") else path.with_name(f".deleting-{path.name}")
    path.rename(trash)
    shutil.rmtree(trash)
    log.info("deleted run directory %s", path)
