"""MLflow set-up shared by the train and register stages (one tracking store, one artifact root).

A relative `sqlite:///mlflow.db` in params would otherwise depend on the working directory of whoever
runs the stage (an Airflow worker, `dvc repro`, a test), splitting one registry into several.
A SQLite store is created, upgraded and checked by `tasks.plumbing.sqlite_store` before MLflow opens it,
so a kill at any moment leaves no store, a complete one, or a damaged one that is named, never used.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import StoreDamaged, StoreUnavailable, UserError
from tasks.core.redact import redact, redact_uri
from tasks.plumbing.sqlite_store import ensure_store, sqlite_path, store_lock

SUPPORTED_SCHEMES = ("sqlite", "http", "https", "databricks", "postgresql", "mysql", "file")


def resolve_tracking_uri(uri: str, root: Path = REPO_ROOT) -> str:
    """Make a relative sqlite/file URI absolute (relative to the repository root); check the scheme."""
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise UserError(
            f"register.tracking_uri: unsupported scheme {scheme or '(none)'!r} in {uri!r}; "
            f"expected one of {', '.join(SUPPORTED_SCHEMES)}"
        )
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        return f"sqlite:///{(root / path).resolve()}"
    return uri


def artifact_root(cfg: Config) -> str:
    """Where MLflow stores run artifacts (a URI): `register.artifact_location`, else mlartifacts/ beside a
    SQLite registry; "" when a tracking server decides."""
    if cfg.register.artifact_location:
        return cfg.register.artifact_location
    path = sqlite_path(resolve_tracking_uri(cfg.register.tracking_uri))
    return (path.parent / "mlartifacts").as_uri() if path is not None else ""


@contextmanager
def artifact_store_errors(location: str | None) -> Iterator[None]:
    """An artifact store fault (S3 endpoint, bucket, credentials) as one redacted line, not a traceback.

    Raises:
        StoreUnavailable: naming `register.artifact_location` and the store's own message (Airflow
            retries the task: the endpoint may come back, or the bucket and key be fixed meanwhile).
    """
    try:
        yield
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("botocore", "boto3", "s3transfer"):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise StoreUnavailable(
            redact(
                f"register.artifact_location={location!r}: the artifact store failed "
                f"({type(exc).__name__}: {first})"
            )
        ) from None


def setup_mlflow(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    Imports mlflow lazily (it is heavy) and creates the experiment with a fixed artifact root.
    """
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    uri = resolve_tracking_uri(cfg.register.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with _first_use_lock(uri):
            db = sqlite_path(uri)
            if db is not None:
                ensure_store(db)  # before MLflow could create or migrate it in place
            client = mlflow.MlflowClient()
            exp = client.get_experiment_by_name(cfg.register.experiment)
            if exp is None:
                root = artifact_root(cfg)
                exp_id = client.create_experiment(cfg.register.experiment, artifact_location=root or None)
            else:
                _same_location(cfg, exp.artifact_location)
                exp_id = exp.experiment_id
    except (MlflowException, SQLAlchemyError, sqlite3.Error, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if "out-of-date database schema" in reason:  # a server database MLflow will not migrate itself
            raise StoreDamaged(
                redact(
                    f"register.tracking_uri={cfg.register.tracking_uri!r}: the store is incompatible ({reason})"
                )
            ) from None
        raise StoreUnavailable(
            redact(
                f"register.tracking_uri={cfg.register.tracking_uri!r}: the MLflow store {uri} is unavailable "
                f"({type(exc).__name__}: {reason})"
            )
        ) from None
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _same_location(cfg: Config, existing: str) -> None:
    """An experiment keeps the artifact location it was created with: a changed setting is refused."""
    wanted = cfg.register.artifact_location
    if wanted and existing.rstrip("/") != wanted.rstrip("/"):
        raise UserError(
            f"register.artifact_location={wanted!r}: experiment {cfg.register.experiment!r} stores its "
            f"artifacts in {redact(existing)!r}; name a new register.experiment to use another location"
        )


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store: creating or migrating its schema, and creating the experiment
    (two processes doing either at once fail: "duplicate column name", "already exists")."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with store_lock(db):
        yield


def repair_registry(cfg: Config) -> dict[str, Any]:
    """`qa-lora registry repair`: restore or finish the migration of a damaged SQLite store, with proof.

    Args:
        cfg: the configuration (`register.tracking_uri`).

    Returns:
        What was done and the number of models, versions, aliases, tags and runs there afterwards.

    Raises:
        UserError: the store is not a SQLite file (a server database is repaired with `mlflow db upgrade`
            from its own backup).
        StoreDamaged: it could not be repaired without losing a fact (it is left as it was).
    """
    from tasks.plumbing.store_repair import repair_store

    uri = resolve_tracking_uri(cfg.register.tracking_uri)
    db = sqlite_path(uri)
    if db is None:
        raise UserError(
            f"register.tracking_uri={redact_uri(uri)!r}: `qa-lora registry repair` repairs a sqlite:/// store; "
            "for a server database restore its backup and run `mlflow db upgrade`"
        )
    return repair_store(db)
