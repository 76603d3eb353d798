"""MLflow set-up shared by the train and register stages (one tracking store, one artifact root).

A relative `sqlite:///mlflow.db` in params would otherwise depend on the working directory of whoever
runs the stage (an Airflow worker, `dvc repro`, a test), splitting one registry into several.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import StoreUnavailable, UserError

SUPPORTED_SCHEMES = ("sqlite", "http", "https", "databricks", "postgresql", "mysql", "file")


def resolve_tracking_uri(uri: str, root: Path = REPO_ROOT) -> str:
    """Make a relative sqlite/file URI absolute (relative to the repository root); check the scheme."""
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise UserError(
            f"register.tracking_uri: unsupported scheme {scheme or '(none)'!r} in {uri!r}; "
            f"expected one of {', '.join(SUPPORTED_SCHEMES)}"
        )
    if scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri[len('sqlite:///') :]).resolve()}"
    return uri


def artifact_root(cfg: Config) -> str:
    """Where MLflow stores run artifacts for a local store: mlartifacts/ beside the registry database."""
    uri = resolve_tracking_uri(cfg.register.tracking_uri)
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent / "mlartifacts")
    return ""  # a tracking server decides


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
            client = mlflow.MlflowClient()
            exp = client.get_experiment_by_name(cfg.register.experiment)
            if exp is None:
                root = artifact_root(cfg)
                exp_id = client.create_experiment(
                    cfg.register.experiment, artifact_location=Path(root).as_uri() if root else None
                )
            else:
                exp_id = exp.experiment_id
    except (MlflowException, SQLAlchemyError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise StoreUnavailable(
            f"register.tracking_uri={cfg.register.tracking_uri!r}: the MLflow store {uri} is unavailable "
            f"({type(exc).__name__}: {reason})"
        ) from None
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store: MLflow creates/migrates its schema on first use, and two
    processes doing that at once fail ("duplicate column name"); so would two creating the experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    path = Path(uri[len("sqlite:///") :]).with_suffix(".setup.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=600):
        yield
