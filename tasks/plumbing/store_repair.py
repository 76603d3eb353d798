"""`qa-lora registry repair`: bring a damaged SQLite MLflow store back, proving nothing was lost.

Two ways, tried in order, each on a work file beside the store (the damaged file is only moved aside,
to `<db>.damaged-<time>`, once a repaired copy has passed the proof):

1. restore a pre-migration backup (`<db>.backup-<revision>`, written before every upgrade) and migrate
   it to the head revision;
2. finish the migration: build a fresh store at the head revision and copy every row of every table
   into it, reading a table from alembic's `_alembic_tmp_<table>` copy when a kill left only that.

The proof: every registered model, version, alias, version tag, model tag and run readable in the
damaged store (and in the backup used) is in the repaired one; otherwise the repair is refused and the
store is left as it was.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from tasks.core.errors import StoreDamaged
from tasks.plumbing.sqlite_store import (
    TMP_PREFIX,
    backups_of,
    build_beside,
    ensure_store,
    inspect_store,
    migrate_to_head,
    sqlite_copy,
    stamp,
    store_lock,
    swap_into_place,
)

log = logging.getLogger("qa_lora.store")

# What must survive a repair: (kind, table, columns that identify one fact).
FACTS = (
    ("models", "registered_models", ("name",)),
    ("versions", "model_versions", ("name", "version")),
    ("aliases", "registered_model_aliases", ("name", "alias", "version")),
    ("version_tags", "model_version_tags", ("name", "version", "key", "value")),
    ("model_tags", "registered_model_tags", ("name", "key", "value")),
    ("runs", "runs", ("run_uuid",)),
)


def repair_store(path: Path) -> dict[str, Any]:
    """Repair the SQLite store at `path` (restore a backup, else finish the migration) and prove it.

    Args:
        path: the store's database file.

    Returns:
        {"store", "status" ("healthy"/"repaired"), "method", "damaged_copy", and per kind of fact
        (models, versions, aliases, version_tags, model_tags, runs) the count found after the repair}.

    Raises:
        StoreDamaged: no way of repairing it kept every fact (the store is left as it was).
    """
    with store_lock(path):
        state = inspect_store(path)
        if not state.exists or state.problem is None:
            ensure_store(path)  # a missing or merely outdated store: the ordinary open path handles it
            return {"store": str(path), "status": "healthy", **_counts(read_facts(path))}
        try:
            expected = read_facts(path)
            work, method = _restore_backup(path, expected) or _finish_migration(path, expected)
            aside = _keep_aside(path)
        except sqlite3.DatabaseError as exc:
            raise StoreDamaged(
                f"the MLflow store {path} could not be repaired ({type(exc).__name__}: {exc}); it was left "
                "untouched (restore a copy of it, or move it aside to start a new registry)"
            ) from None
        swap_into_place(work, path)
    log.info("repaired %s (%s); the damaged store is kept at %s", path, method, aside)
    return {
        "store": str(path),
        "status": "repaired",
        "method": method,
        "damaged_copy": str(aside),
        **_counts(read_facts(path)),
    }


def read_facts(path: Path) -> dict[str, set[tuple[str, ...]]]:
    """Every model, version, alias, tag and run id in a store, reading alembic's copy of a table that a
    kill left only as `_alembic_tmp_<table>` (errors propagate: a fact that cannot be read is not kept).
    """
    with closing(sqlite3.connect(path)) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        facts: dict[str, set[tuple[str, ...]]] = {}
        for kind, table, cols in FACTS:
            source = table if table in tables else TMP_PREFIX + table
            if source not in tables:
                facts[kind] = set()
                continue
            select = ", ".join(f'"{c}"' for c in cols)
            rows = con.execute(f'select {select} from "{source}"').fetchall()
            facts[kind] = {tuple(str(v) for v in row) for row in rows}
    return facts


def missing_facts(expected: dict[str, set[tuple[str, ...]]], path: Path) -> dict[str, list[tuple[str, ...]]]:
    """The facts of `expected` that the store at `path` lacks (empty when none is lost)."""
    found = read_facts(path)
    return {k: sorted(v - found[k]) for k, v in expected.items() if v - found[k]}


def _keep_aside(path: Path) -> Path:
    """A byte-identical copy of the damaged store (and its journal), for forensics or a manual restore."""
    aside = path.with_name(f"{path.name}.damaged-{stamp()}")
    for side in ("-journal", ""):  # the database last: its presence marks a complete copy
        if Path(f"{path}{side}").is_file():
            shutil.copyfile(f"{path}{side}", f"{aside}{side}")
    return aside


def _counts(facts: dict[str, set[tuple[str, ...]]]) -> dict[str, int]:
    return {kind: len(values) for kind, values in facts.items()}


def _restore_backup(path: Path, expected: dict[str, set[tuple[str, ...]]]) -> tuple[Path, str] | None:
    """The newest backup that, migrated to the head, holds every fact of the damaged store."""
    for backup in backups_of(path):
        state = inspect_store(backup)
        if state.problem is not None:
            log.info("backup %s is not usable (%s)", backup, state.problem)
            continue

        def restore(work: Path, source: Path = backup) -> None:
            sqlite_copy(source, work)
            migrate_to_head(work, create=False)

        work = build_beside(path, "repairing", restore)
        lost = missing_facts(expected, work)
        if not lost:
            return work, f"restored {backup.name} and migrated it to the head revision"
        log.info("backup %s lacks %s; not used", backup, {k: len(v) for k, v in lost.items()})
    return None


def _finish_migration(path: Path, expected: dict[str, set[tuple[str, ...]]]) -> tuple[Path, str]:
    """A fresh head-revision store holding every row of the damaged one (common columns)."""

    def rebuild(work: Path) -> None:
        migrate_to_head(work, create=True)
        copy_rows(path, work)

    try:
        work = build_beside(path, "repairing", rebuild)
    except (sqlite3.DatabaseError, StoreDamaged) as exc:
        raise StoreDamaged(
            f"the MLflow store {path} could not be repaired: copying its rows into a fresh store failed "
            f"({type(exc).__name__}: {exc}); it was left untouched"
        ) from None
    lost = missing_facts(expected, work)
    if lost:
        raise StoreDamaged(
            f"the MLflow store {path} could not be repaired without loss (missing afterwards: "
            f"{ {k: len(v) for k, v in lost.items()} }); it was left untouched"
        )
    return work, "finished the migration: rows copied into a fresh store at the head revision"


def copy_rows(src: Path, dst: Path) -> None:
    """Replace the rows of every table of `dst` that `src` also holds (or holds as alembic's copy)."""
    with closing(sqlite3.connect(dst)) as con:
        con.execute("attach database ? as old", (str(src),))
        old = {r[0] for r in con.execute("select name from old.sqlite_master where type='table'")}
        new = [r[0] for r in con.execute("select name from main.sqlite_master where type='table'")]
        with con:  # one transaction: all rows or none
            for table in new:
                if table == "alembic_version" or table.startswith("sqlite_"):
                    continue
                source = table if table in old else TMP_PREFIX + table
                if source not in old:
                    continue
                cols = _columns(con, "main", table) & _columns(con, "old", source)
                names = ", ".join(f'"{c}"' for c in sorted(cols))
                con.execute(f'delete from main."{table}"')
                con.execute(f'insert into main."{table}" ({names}) select {names} from old."{source}"')
        con.execute("detach database old")


def _columns(con: sqlite3.Connection, schema: str, table: str) -> set[str]:
    return {r[1] for r in con.execute(f'pragma {schema}.table_info("{table}")')}
