"""The MLflow SQLite store survives kill -9 at any moment of its creation and of its upgrades (issue #19).

Real processes are killed with SIGKILL while they open a store the way every stage does
(`tasks.plumbing.tracking.setup_mlflow`). Kill delays are spread over the whole creation (or upgrade),
measured first on this machine, so the test never relies on one lucky moment. After each kill the store
is either absent or complete (never half-migrated), and the next use (setup_mlflow, an MLflow run, a
registration with alias and tags) succeeds with every earlier version, alias and tag still there.
A damaged store holding data is refused with a "damaged"/"half-migrated" line naming
`qa-lora registry repair`, left byte-identical, and repaired by that command without loss.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tasks.core.errors import StoreDamaged, StoreUnavailable, UserError
from tasks.plumbing.sqlite_store import alembic_config, head_revision, inspect_store
from tasks.plumbing.store_repair import missing_facts, read_facts

QA_LORA = str(Path(sys.executable).with_name("qa-lora"))
OLD_REVISION = "6f8d9c3b2a1e"  # five migrations before MLflow 3.17's head: an "older MLflow" store
MODEL = "qa-lora-store-test"
WORK_SUFFIXES = (".creating", ".migrating", ".partial", "-journal")

# The child every test kills or runs: imports first (so kill delays measure the store work only), then
# prints READY and opens the store. `verify` opens each store, logs a run and registers a version with
# an alias and a tag: what train and register do first.
CHILD = r"""
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
import mlflow, alembic, sqlalchemy  # noqa: F401
from mlflow import MlflowClient
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from tasks.core.config import load_config
from tasks.plumbing.tracking import setup_mlflow

def cfg(db):
    return load_config(overrides=[("register.tracking_uri", f"sqlite:///{db}"), ("register.model_name", "MODEL")])

mode, paths = sys.argv[1], sys.argv[2:]
print("READY", flush=True)
t0 = time.monotonic()
if mode == "open":
    setup_mlflow(cfg(paths[0]))
elif mode == "legacy":  # MLflow's own in-place creation: what bricked the registry before the fix
    SqlAlchemyStore(f"sqlite:///{paths[0]}", paths[0] + ".art")
elif mode == "verify":
    for db in paths:
        setup_mlflow(cfg(db))
        with mlflow.start_run():
            mlflow.log_param("step", 1)
        c = MlflowClient()
        if not c.search_registered_models(f"name = 'MODEL'"):
            c.create_registered_model("MODEL")
        v = c.create_model_version("MODEL", source=str(db) + ".art", tags={"qa_lora.run_id": db})
        c.set_registered_model_alias("MODEL", "candidate", v.version)
        c.set_model_version_tag("MODEL", v.version, "qa_lora.checked", "yes")
        if str(v.version) == "1":
            c.set_registered_model_alias("MODEL", "champion", "1")
            c.set_registered_model_tag("MODEL", "qa_lora.champion_history", '["1"]')
print("DONE", json.dumps({"seconds": time.monotonic() - t0}), flush=True)
""".replace("MODEL", MODEL)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _spawn(mode: str, *dbs: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, *map(str, dbs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _ready(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """Block until the child has imported everything and starts on the store."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "READY", (
        f"child did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
    )
    return proc


def _child(mode: str, *dbs: Path) -> subprocess.Popen[str]:
    return _ready(_spawn(mode, *dbs))


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[float, str]:
    """Wait for a child; its store-work seconds and stderr (fails the test on a non-zero exit)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{err[-3000:]}"
    done = [ln for ln in out.splitlines() if ln.startswith("DONE ")]
    return float(json.loads(done[-1][5:])["seconds"]), err


def _kill_after(proc: subprocess.Popen[str], delay: float) -> bool:
    """SIGKILL the child `delay` s after it started the store work; True when it was still working."""
    time.sleep(delay)
    alive = proc.poll() is None
    proc.kill()  # kill -9
    proc.communicate(timeout=60)
    return alive


def _spread(seconds: float, n: int = 9) -> list[float]:
    """n delays across [0, 1.1 x seconds]: from the very start to just after the end of the work."""
    return [round(seconds * 1.1 * i / (n - 1), 3) for i in range(n)]


def _assert_absent_or_complete(db: Path) -> str:
    state = inspect_store(db)
    if not state.exists:
        return "absent"
    assert state.problem is None, f"{db}: {state.problem}"
    assert state.revision == state.head, f"{db}: at revision {state.revision}, not {state.head}"
    return "complete"


def _work_files(db: Path) -> list[str]:
    """Files a build, backup or migration beside the store was writing (left by a kill mid-way)."""
    return sorted(p.name for p in db.parent.glob(f"{db.name}.*") if p.name.endswith(WORK_SUFFIXES))


def _cli(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    sets = ["--set", f"register.tracking_uri=sqlite:///{db}", "--set", f"register.model_name={MODEL}"]
    cmd = [QA_LORA, *args, *sets]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


# ------------------------------------------------------------------------------------------ creation


def test_kill_9_during_creation_leaves_no_store_or_a_complete_one(tmp_path: Path) -> None:
    seconds, _ = _finish(_child("open", tmp_path / "calibrate" / "mlflow.db"))
    delays = _spread(seconds)
    dbs, outcomes = [], []
    for i, delay in enumerate(delays):
        db = tmp_path / f"kill{i}" / "mlflow.db"
        db.parent.mkdir()
        alive = _kill_after(_child("open", db), delay)
        mid_build = _work_files(db)
        outcomes.append((delay, alive, mid_build, _assert_absent_or_complete(db)))
        dbs.append(db)
    print(f"creation took {seconds:.2f}s here; kills (delay s, alive, work files, store): {outcomes}")
    # The test itself is meaningful only if kills landed mid-creation (a half-built work file left).
    assert any(alive and mid for _, alive, mid, _ in outcomes), outcomes

    _finish(_child("verify", *dbs))  # the next use of every store: open, a run, a registration
    for db in dbs:
        assert _assert_absent_or_complete(db) == "complete"
        assert read_facts(db)["aliases"] == {(MODEL, "candidate", "1"), (MODEL, "champion", "1")}


def test_racing_first_opens_both_succeed(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    first, second = _spawn("open", db), _spawn("open", db)  # both import at once, then race
    _ready(first)
    _ready(second)
    _finish(first)
    _finish(second)
    assert _assert_absent_or_complete(db) == "complete"


def test_store_half_migrated_by_mlflow_in_place_is_rebuilt_when_empty(tmp_path: Path) -> None:
    """What bricked the registry before (MLflow creating in place, killed): rebuilt on the next open."""
    seconds, _ = _finish(_child("legacy", tmp_path / "calibrate.db"))
    dbs = []
    for i, delay in enumerate(_spread(seconds, n=4)[1:]):
        db = tmp_path / f"legacy{i}" / "mlflow.db"
        db.parent.mkdir()
        _kill_after(_child("legacy", db), delay)
        dbs.append(db)
    # One deterministic image of the store as well: a leftover alembic table, an older stamp.
    db = tmp_path / "stamped" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(tmp_path / "calibrate.db", db)
    _half_migrate(db)
    dbs.append(db)
    _, err = _finish(_child("verify", *dbs))
    assert "half-migrated: leftover _alembic_tmp_experiments" in err and "rebuilt it (nothing to lose)" in err
    for db in dbs:
        assert _assert_absent_or_complete(db) == "complete"


# ------------------------------------------------------------------------------------ upgrades, repair


@pytest.fixture(scope="module")
def old_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A store with runs, versions, aliases and tags, at an older schema revision (an MLflow upgrade)."""
    db = tmp_path_factory.mktemp("old") / "mlflow.db"
    _finish(_child("verify", db, db))  # two versions, alias, tags, runs
    import sqlalchemy
    from alembic import command

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    config = alembic_config(f"sqlite:///{db}")
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, OLD_REVISION)
    engine.dispose()
    state = inspect_store(db)
    assert state.problem is None and state.revision == OLD_REVISION and state.has_data
    facts = read_facts(db)
    assert (
        len(facts["versions"]) == 2 and len(facts["aliases"]) == 2 and facts["model_tags"] and facts["runs"]
    )
    return db, facts


def _copy_old(old_store: tuple[Path, dict[str, Any]], dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(old_store[0], dest)
    return dest


def test_kill_9_during_upgrade_loses_nothing(tmp_path: Path, old_store: tuple[Path, dict[str, Any]]) -> None:
    expected = old_store[1]
    seconds, err = _finish(_child("open", _copy_old(old_store, tmp_path / "calibrate" / "mlflow.db")))
    assert "backed up to" in err
    delays = _spread(seconds, n=8)
    dbs, outcomes = [], []
    for i, delay in enumerate(delays):
        db = _copy_old(old_store, tmp_path / f"up{i}" / "mlflow.db")
        alive = _kill_after(_child("open", db), delay)
        mid_upgrade = _work_files(db)
        state = inspect_store(db)
        assert state.problem is None and state.revision in (OLD_REVISION, head_revision()), state
        assert not missing_facts(expected, db), f"killed after {delay}s: facts lost"
        outcomes.append((delay, alive, mid_upgrade, state.revision))
        dbs.append(db)
    print(f"upgrade took {seconds:.2f}s here; kills (delay s, alive, work files, revision): {outcomes}")
    assert any(alive and mid for _, alive, mid, _ in outcomes), outcomes

    _finish(_child("verify", *dbs))  # registers version 3 and moves `candidate` to it
    kept = {**expected, "aliases": {a for a in expected["aliases"] if a[1] != "candidate"}}
    for db in dbs:
        assert inspect_store(db).revision == head_revision()
        assert not missing_facts(kept, db)
        assert (MODEL, "candidate", "3") in read_facts(db)["aliases"]


def test_damaged_store_with_data_is_refused_untouched_then_repaired(
    tmp_path: Path, old_store: tuple[Path, dict[str, Any]]
) -> None:
    db = _copy_old(old_store, tmp_path / "mlflow.db")
    expected = read_facts(db)
    _half_migrate(db, drop="model_version_tags")  # a kill between alembic's DROP and RENAME
    before = db.read_bytes()

    refused = _cli("promote", "1", db=db)
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "damaged (half-migrated" in line and "qa-lora registry repair" in line, line
    assert "unavailable" not in line
    assert db.read_bytes() == before  # never touched silently

    repaired = _cli("registry", "repair", db=db)
    assert repaired.returncode == 0, repaired.stderr
    report = json.loads(repaired.stdout)
    assert report["status"] == "repaired" and report["method"].startswith("finished the migration")
    assert report["versions"] == 2 and report["version_tags"] == len(expected["version_tags"])
    assert not missing_facts(expected, db)
    assert Path(report["damaged_copy"]).read_bytes() == before
    _finish(_child("verify", db))  # and the store works again
    assert (MODEL, "3") in read_facts(db)["versions"] and not missing_facts(
        {**expected, "aliases": set()}, db
    )


def test_repair_restores_the_pre_upgrade_backup(
    tmp_path: Path, old_store: tuple[Path, dict[str, Any]]
) -> None:
    db = _copy_old(old_store, tmp_path / "mlflow.db")
    expected = read_facts(db)
    shutil.copy(db, tmp_path / f"mlflow.db.backup-{OLD_REVISION}")  # what an upgrade writes first
    _half_migrate(db)
    repaired = _cli("registry", "repair", db=db)
    assert repaired.returncode == 0, repaired.stderr
    report = json.loads(repaired.stdout)
    assert report["method"].startswith(f"restored mlflow.db.backup-{OLD_REVISION}"), report
    assert inspect_store(db).revision == head_revision()
    assert not missing_facts(expected, db)


def test_unreadable_store_is_damaged_not_unavailable(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreDamaged, match="damaged"):
        inspect_store(db)
    # The DAG retries StoreUnavailable only: a damaged store fails once.
    assert issubclass(StoreDamaged, UserError) and not issubclass(StoreDamaged, StoreUnavailable)


def _half_migrate(db: Path, drop: str | None = None) -> None:
    """The state a kill inside alembic's batch migration leaves: an `_alembic_tmp_` copy of a table (and,
    with `drop`, that table already dropped), the revision stamp still at the step before."""
    with sqlite3.connect(db) as con:
        con.execute("create table _alembic_tmp_experiments as select * from experiments")
        if drop:
            con.execute(f"create table _alembic_tmp_{drop} as select * from {drop}")
            con.execute(f"drop table {drop}")
        con.execute("update alembic_version set version_num = ?", ("c8d9e0f1a2b3",))
    con.close()
