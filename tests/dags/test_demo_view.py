"""`make demo`'s quiet view: one console line per finished task of the new run, each printed once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from scripts.demo import DAG_ID, report_tasks, run_ids


def _db(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE dag_run (id INTEGER PRIMARY KEY, dag_id TEXT, run_id TEXT)")
    con.execute(
        "CREATE TABLE task_instance (dag_id TEXT, run_id TEXT, task_id TEXT, state TEXT, start_date TEXT, end_date TEXT)"
    )
    con.execute("INSERT INTO dag_run (dag_id, run_id) VALUES (?, 'manual__old')", (DAG_ID,))
    con.execute(
        "INSERT INTO task_instance VALUES (?, 'manual__old', 'prepare', 'success', "
        "'2026-11-29 10:00:00.000000', '2026-11-29 10:00:03.000000')",
        (DAG_ID,),
    )
    con.commit()
    return con


def test_one_line_per_finished_task_of_the_new_run(tmp_path: Path, capsys) -> None:
    db = tmp_path / "airflow.db"
    con = _db(db)
    earlier, reported = run_ids(db), set()
    assert report_tasks(db, earlier, reported) == []  # the old run's tasks are not ours
    con.execute("INSERT INTO dag_run (dag_id, run_id) VALUES (?, 'manual__new')", (DAG_ID,))
    rows = [
        ("prepare", "success", "2026-11-29 11:00:00.000000", "2026-11-29 11:00:02.500000"),
        ("validate", "running", "2026-11-29 11:00:03.000000", None),
        ("export", "skipped", None, None),
    ]
    con.executemany(
        "INSERT INTO task_instance VALUES (?, 'manual__new', ?, ?, ?, ?)", [(DAG_ID, *r) for r in rows]
    )
    con.commit()
    first = report_tasks(db, earlier, reported)
    assert [line.split()[:2] for line in first] == [["prepare", "success"], ["export", "skipped"]]
    assert "2.5 s" in first[0]
    con.execute(
        "UPDATE task_instance SET state = 'failed', end_date = '2026-11-29 11:00:10.000000' WHERE task_id = 'validate'"
    )
    con.commit()
    second = report_tasks(db, earlier, reported)
    assert [line.split()[:2] for line in second] == [["validate", "failed"]]  # earlier lines not repeated
    assert capsys.readouterr().out.count("\n") == 3
