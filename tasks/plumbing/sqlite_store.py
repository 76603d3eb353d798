"""A SQLite MLflow store that no kill can leave half-built or half-migrated.

MLflow creates and migrates a SQLite store in place, one alembic step after another, and SQLite commits
the DDL of each step as it goes: a process killed mid-way leaves `_alembic_tmp_*` tables and an
intermediate revision, and every later open fails ("table _alembic_tmp_experiments already exists").
So, before MLflow opens a store (callers hold :func:`store_lock`):

* a missing store is built and migrated beside the target (`<db>.creating`) and renamed into place:
  racing processes and kills see either no store or a complete one;
* a store at an older revision (an MLflow upgrade) is backed up (`<db>.backup-<revision>`, when it holds
  data), migrated as a copy (`<db>.migrating`) and renamed into place: the original is never touched
  half-way;
* a damaged store (leftover `_alembic_tmp_*` tables, no or an unknown revision, a failed integrity check,
  an upgrade that fails) is rebuilt when it is empty (nothing to lose; one log line) and otherwise
  refused with :class:`StoreDamaged`, naming `qa-lora registry repair` (:func:`repair_store`), which
  restores a backup or finishes the migration by copying every row into a fresh store, then proves that
  no model version, alias or tag was lost.

Reads of the store's state never swallow errors: an unreadable file is a damaged store.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.core.errors import StoreDamaged, StoreUnavailable

log = logging.getLogger("qa_lora.store")

TMP_PREFIX = "_alembic_tmp_"  # alembic's batch-mode copies of a table being altered
REPAIR_COMMAND = "qa-lora registry repair"
# Tables whose rows are worth keeping: a store holding any of them is never rebuilt silently.
DATA_TABLES = ("runs", "registered_models", "model_versions", "logged_models", "trace_info")
LOCK_TIMEOUT_S = 600.0
BUSY_TIMEOUT_S = 60.0  # how long a read waits for a writer of the store (SQLite busy timeout)


@dataclass(frozen=True)
class StoreState:
    """What a SQLite store file holds, read without changing it (beyond SQLite's own journal recovery)."""

    path: Path
    exists: bool
    revision: str | None = None
    head: str = ""
    tmp_tables: tuple[str, ...] = ()
    rows: dict[str, int] = field(default_factory=dict)
    problem: str | None = None  # why the store is damaged, or None

    @property
    def has_data(self) -> bool:
        """True when the store holds runs, registered models, versions, logged models or traces."""
        return any(self.rows.values())

    @property
    def outdated(self) -> bool:
        """A consistent store at an older revision (a migration is due)."""
        return self.exists and self.problem is None and self.revision != self.head


def sqlite_path(uri: str) -> Path | None:
    """The database file of an absolute `sqlite:///` URI, or None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextmanager
def store_lock(path: Path) -> Iterator[None]:
    """Serialise creating, migrating, repairing and first use of one store across processes.

    A kernel file lock (flock): a process killed with -9 releases it at once.
    """
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".setup.lock")), timeout=LOCK_TIMEOUT_S):
        yield


def ensure_store(path: Path) -> StoreState:
    """Make `path` a complete store at MLflow's head revision, or refuse (call under :func:`store_lock`).

    Returns:
        The store's state once ready.

    Raises:
        StoreDamaged: the store is damaged and holds data, or its upgrade failed (it is left untouched).
    """
    _remove_leftovers(path)
    state = inspect_store(path)
    if not state.exists:
        log.info("creating the MLflow store %s (built beside it, then renamed into place)", path)
        _build_fresh(path)
    elif state.problem is not None and not state.has_data:
        log.warning("%s: %s and empty; rebuilt it (nothing to lose)", path, state.problem)
        _build_fresh(path)
    elif state.problem is not None:
        raise StoreDamaged(damaged_message(state))
    elif state.outdated and not state.has_data:
        log.warning("%s: empty store at revision %s; rebuilt it at %s", path, state.revision, state.head)
        _build_fresh(path)
    elif state.outdated:
        _upgrade_in_copy(state)
    else:
        return state  # complete at the head revision: nothing written
    return inspect_store(path)


def damaged_message(state: StoreState) -> str:
    """One line: which store, what is wrong, what it holds, the command that repairs it."""
    held = ", ".join(f"{n} {t}" for t, n in state.rows.items() if n) or "data"
    return (
        f"the MLflow store {state.path} is damaged ({state.problem}); it holds {held}, so it was left "
        f"untouched: run `{REPAIR_COMMAND}` (restores its backup or finishes the migration)"
    )


# ------------------------------------------------------------------------------------------ reading


@functools.cache
def head_revision() -> str:
    """The newest schema revision of the installed MLflow."""
    return _script().get_current_head() or ""


def inspect_store(path: Path) -> StoreState:
    """Read a store's revision, leftover migration tables, data row counts and integrity.

    Raises:
        StoreDamaged: the file is not a readable SQLite database (its rows cannot even be counted).
        StoreUnavailable: it cannot be read now (locked by a writer past the busy timeout, no permission).
    """
    if not path.is_file() or path.stat().st_size == 0:
        return StoreState(path, exists=False, head=head_revision())
    try:
        with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            revision = _revision(con, tables)
            rows = {t: _count(con, tables, t) for t in DATA_TABLES}
            check = con.execute("pragma quick_check").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if _transient(exc):  # busy past the timeout, or no permission: the store may come back
            raise StoreUnavailable(f"the MLflow store {path} is unavailable ({exc})") from None
        raise _unreadable(path, exc) from None
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) from None
    head = head_revision()
    tmp = tuple(sorted(t for t in tables if t.startswith(TMP_PREFIX)))
    problem = _problem(tables, revision, tmp, check)
    return StoreState(path, True, revision, head, tmp, rows, problem)


def _transient(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("locked", "unable to open", "readonly", "disk i/o"))


def _unreadable(path: Path, exc: Exception) -> StoreDamaged:
    return StoreDamaged(
        f"the MLflow store {path} is damaged (not a readable SQLite database: {exc}); it was left "
        f"untouched: run `{REPAIR_COMMAND}` or move it aside"
    )


def _problem(tables: set[str], revision: str | None, tmp: tuple[str, ...], check: str) -> str | None:
    if tmp:
        return f"half-migrated: leftover {', '.join(tmp)} at revision {revision}"
    if revision is None:
        return "half-built: tables without a schema revision" if tables else "no MLflow tables"
    if not _known(revision):
        return f"incompatible: revision {revision} is unknown to the installed MLflow (a newer one?)"
    if check != "ok":
        return f"integrity check failed: {check}"
    return None


def _revision(con: sqlite3.Connection, tables: set[str]) -> str | None:
    if "alembic_version" not in tables:
        return None
    row = con.execute("select version_num from alembic_version").fetchone()
    return str(row[0]) if row else None


def _count(con: sqlite3.Connection, tables: set[str], table: str) -> int:
    """Rows of a table, looking into alembic's copy too (a kill between DROP and RENAME leaves only it)."""
    for name in (table, TMP_PREFIX + table):
        if name in tables:
            return int(con.execute(f'select count(*) from "{name}"').fetchone()[0])
    return 0


def _known(revision: str) -> bool:
    from alembic.util import CommandError

    try:
        return _script().get_revision(revision) is not None
    except (CommandError, KeyError):
        return False


@functools.cache
def _script() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(""))


def alembic_config(url: str) -> Any:
    """Alembic configured with MLflow's own migration scripts (what `mlflow db upgrade` runs)."""
    import mlflow
    from alembic.config import Config

    scripts = Path(mlflow.__file__).parent / "store" / "db_migrations"
    config = Config(str(scripts / "alembic.ini"))
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


# ----------------------------------------------------------------------------------- building beside


def build_beside(path: Path, suffix: str, fill: Any) -> Path:
    """Run `fill(work_path)` on a fresh work file beside `path`; return it once it checks out complete.

    Raises:
        StoreDamaged: the work file is not a complete store at the head revision afterwards.
    """
    work = path.with_name(f"{path.name}.{suffix}")
    _unlink_db(work)
    fill(work)
    state = inspect_store(work)
    if state.problem is not None or state.revision != state.head:
        raise StoreDamaged(f"{work}: building the store did not finish cleanly ({state.problem})")
    _fsync(work)
    return work


def swap_into_place(work: Path, path: Path) -> None:
    """Rename a complete work file over the store (atomic); stale journals of the old file go first."""
    for side in ("-journal", "-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)
    os.replace(work, path)
    _fsync(path.parent)


def migrate_to_head(path: Path, *, create: bool) -> None:
    """MLflow's schema on `path`: its initial tables when `create`, then every migration up to the head."""
    import sqlalchemy
    from alembic import command

    url = f"sqlite:///{path}"
    engine = sqlalchemy.create_engine(url)
    try:
        if create:
            from mlflow.store.tracking.dbmodels.initial_models import Base

            Base.metadata.create_all(engine)
        config = alembic_config(url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "heads")
    finally:
        engine.dispose()


def sqlite_copy(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite database (the backup API), written beside `dst` and renamed."""
    tmp = dst.with_name(f"{dst.name}.partial")
    _unlink_db(tmp)
    with closing(sqlite3.connect(src)) as source, closing(sqlite3.connect(tmp)) as target:
        source.backup(target)
    _fsync(tmp)
    os.replace(tmp, dst)


def backups_of(path: Path) -> list[Path]:
    """The store's pre-migration backups, newest first."""
    found = [p for p in path.parent.glob(f"{path.name}.backup-*") if not p.name.endswith(".partial")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def stamp() -> str:
    """A UTC timestamp for file names."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _build_fresh(path: Path) -> None:
    work = build_beside(path, "creating", lambda p: migrate_to_head(p, create=True))
    swap_into_place(work, path)


def _upgrade_in_copy(state: StoreState) -> None:
    """Back up an outdated store holding data, migrate a copy, rename it in; the original stays intact."""
    path = state.path
    backup = path.with_name(f"{path.name}.backup-{state.revision}")
    sqlite_copy(path, backup)
    log.info("%s: revision %s -> %s; backed up to %s first", path, state.revision, state.head, backup)

    def migrate(work: Path) -> None:
        sqlite_copy(path, work)
        migrate_to_head(work, create=False)

    try:
        work = build_beside(path, "migrating", migrate)
    except Exception as exc:  # any failure of MLflow's migration: the store itself is untouched
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StoreDamaged(
            f"the MLflow store {path} could not be migrated from revision {state.revision} "
            f"({type(exc).__name__}: {reason}); it is half-migrated or damaged and was left untouched "
            f"(backup: {backup}): run `{REPAIR_COMMAND}`"
        ) from None
    swap_into_place(work, path)


def _remove_leftovers(path: Path) -> None:
    """Work files of a killed build or migration (only ever written under the store lock)."""
    for suffix in ("creating", "migrating", "repairing"):
        _unlink_db(path.with_name(f"{path.name}.{suffix}"))
    for partial in path.parent.glob(f"{path.name}.*.partial"):
        partial.unlink()


def _unlink_db(path: Path) -> None:
    for side in ("", "-journal", "-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
