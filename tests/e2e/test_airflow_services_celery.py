"""The production layout, really run: CeleryExecutor, PostgreSQL metadata database, Redis broker, and two
Celery workers, one serving the `default` queue and one the `mi300x` queue (the GPU node's), with the
train task routed to `mi300x` and held by the one-slot `mi300x` pool.

PostgreSQL and Redis come from Debian packages (`apt-get install postgresql redis-server`; .ci/run
installs them) and are started here on free loopback ports and stopped at the end. Two runs are admitted
at once (QA_LORA_MAX_ACTIVE_RUNS=2) so that the pool, not the run limit, keeps training one at a time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import pytest
from airflow_api import DAG_ID, project_home, start_postgres, start_redis, start_services, states

from scripts.services import Services, processes_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MISSING = [
    what
    for what, ok in (
        (
            "apache-airflow-providers-celery (pip install -e '.[celery]')",
            importlib.util.find_spec("airflow.providers.celery"),
        ),
        ("psycopg2 (pip install -e '.[celery]')", importlib.util.find_spec("psycopg2")),
        ("asyncpg (pip install -e '.[celery]')", importlib.util.find_spec("asyncpg")),
        ("redis-server (apt-get install redis-server)", shutil.which("redis-server")),
        ("PostgreSQL (apt-get install postgresql)", list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))),
    )
    if not ok
]
if MISSING and not os.environ.get("CI"):  # CI installs them all (.ci/run): there a gap must fail
    pytest.skip(f"Celery layout needs {', '.join(MISSING)}", allow_module_level=True)


@pytest.fixture(scope="module")
def celery_af(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, tiny_base: Path):
    assert not MISSING, MISSING
    tmp = tmp_path_factory.mktemp("af-celery")
    infra = Services(dict(os.environ), tmp / "infra-logs")
    pgdata = Path(tempfile.mkdtemp(prefix="qa-lora-pg-"))
    services = None
    try:
        db = start_postgres(infra, pgdata)
        broker = start_redis(infra)
        orchestrate = {"schedule": None, "trigger_on_dataset": False, "train_target": "celery"}
        extra = project_home(tmp, repo_root, {**orchestrate, "train_queue": "mi300x", "train_pool": "mi300x"})
        extra.update(
            AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=db,
            AIRFLOW__CELERY__BROKER_URL=broker,
            AIRFLOW__CELERY__RESULT_BACKEND="db+"
            + db,  # with its driver: SQLAlchemy 2.1 defaults to psycopg 3
            AIRFLOW__CELERY__WORKER_CONCURRENCY="2",  # the worker could take both trainings: the pool may not
            AIRFLOW__CORE__HOSTNAME_CALLABLE="worker_name.worker_hostname",
            PYTHONPATH=os.pathsep.join(
                p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p
            ),
            QA_LORA_MAX_ACTIVE_RUNS="2",
        )
        services, api = start_services(tmp, extra, pools={"mi300x": 1})
        for queue in ("default", "mi300x"):
            services.start(
                f"worker-{queue}",
                *("celery", "worker", "-q", queue, "--celery-hostname", f"{queue}@%h"),
                env={"QA_LORA_TEST_WORKER": f"{queue}-worker"},
            )
        services.wait_healthy()
        api.login()
        yield services, api, tmp
    finally:
        left = services.stop() if services else []
        infra.stop()
        shutil.rmtree(pgdata, ignore_errors=True)
        assert not left and not processes_of(str(tmp / "airflow")), left


def _when(ti: dict, key: str) -> datetime:
    return datetime.fromisoformat(ti[key])


def test_train_runs_on_the_gpu_worker_one_at_a_time(celery_af) -> None:
    _, api, _ = celery_af
    api.wait_for_dag(DAG_ID)
    api.unpause(DAG_ID)
    run_ids = [api.trigger(DAG_ID, {"max_steps": 10}) for _ in range(2)]
    results = [api.wait_finished(DAG_ID, run_id, timeout=1500) for run_id in run_ids]
    for state, tis in results:
        assert state == "success", states(tis)
        train = tis["train"]
        assert (train["queue"], train["pool"], train["hostname"]) == ("mi300x", "mi300x", "mi300x-worker")
        ran = [ti for task, ti in tis.items() if task != "train" and ti["hostname"]]
        assert ran and {(ti["queue"], ti["hostname"]) for ti in ran} == {("default", "default-worker")}
    first, second = sorted((tis for _, tis in results), key=lambda t: _when(t["train"], "start_date"))
    # the second training was ready (its data versioned) while the first still trained, yet waited
    assert _when(second["version"], "end_date") < _when(first["train"], "end_date")
    assert _when(first["train"], "end_date") <= _when(second["train"], "start_date")
