"""Helpers for the service-level tests: start the real Airflow services, talk to them as the UI does.

The services are started by the same code as `make airflow` (scripts/services.py), in a temp AIRFLOW_HOME
on a free loopback port, with a params overlay that keeps every artifact (data copy, DVC remote, MLflow
registry, runs) in the temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from small_run import write_overlay

from scripts.services import PASSWORD_FILE, Services, airflow_env, prepare_home

DAG_ID = "qa_lora_finetune"
PRODUCER_ID = "qa_dataset_refresh"
FINISHED = {"success", "failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_home(tmp: Path, repo: Path, orchestrate: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Params overlay, a copy of the dataset, and the QA_LORA_* variables that point the DAG at them."""
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / "data" / "qa.jsonl", tmp / "data" / "qa.jsonl")
    sections = {
        "data": {
            "source": f"{tmp}/data/qa.jsonl",
            "allowed_roots": [f"{tmp}/data"],
            "dvc_remote": f"{tmp}/dvc-remote",
        },
        "register": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
        "orchestrate": dict(orchestrate or {"schedule": "0 3 * * 1"}),
    }
    write_overlay(tmp / "params.yaml", repo, sections)
    return {"QA_LORA_PARAMS": str(tmp / "params.yaml"), "QA_LORA_RUNS_ROOT": str(tmp / "runs")}


def start_services(tmp: Path, extra: Mapping[str, str], pools: Mapping[str, int]) -> tuple[Services, Api]:
    """Migrate, create the pools, start the core services, wait until healthy; return them and a client."""
    port = free_port()
    env = airflow_env(tmp / "airflow", port, parallelism=4, extra=extra)
    prepare_home(env, pools)
    services = Services(env, tmp / "airflow" / "logs" / "services")
    services.start_core()
    return services, Api(env)


class Api:
    """The REST API v2 with a token from /auth/token, as the UI uses it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.base = env["AIRFLOW__API__BASE_URL"]
        self.http = httpx.Client(base_url=self.base, timeout=30)

    def login(self) -> None:
        passwords = json.loads((Path(self.env["AIRFLOW_HOME"]) / PASSWORD_FILE).read_text())
        resp = self.http.post("/auth/token", json={"username": "admin", "password": passwords["admin"]})
        assert resp.status_code in (200, 201), resp.text
        self.http.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def call(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.http.request(method, f"/api/v2{path}", **kw)
        assert resp.status_code < 300, f"{method} {path}: {resp.status_code} {resp.text[:2000]}"
        return resp.json() if resp.content else None

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self.http.get(f"/api/v2/dags/{dag_id}")
            if resp.status_code == 200:
                return resp.json()
            time.sleep(1)
        raise TimeoutError(f"{dag_id} not parsed after {timeout} s")

    def unpause(self, dag_id: str) -> dict:
        return self.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        run = self.call(
            "POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": dict(conf or {})}
        )
        return run["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100})["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def tasks(self, dag_id: str, run_id: str) -> dict[str, dict]:
        tis = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {ti["task_id"]: ti for ti in tis["task_instances"]}

    def wait(self, dag_id: str, run_id: str, until: Any, timeout: float = 1200, what: str = "") -> dict:
        """Poll the run's task instances until `until(tasks)` is true, or the run has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tis = self.tasks(dag_id, run_id)
            if until(tis) or self.run(dag_id, run_id)["state"] in FINISHED:
                return tis
            time.sleep(2)
        states = {k: v["state"] for k, v in self.tasks(dag_id, run_id).items()}
        raise TimeoutError(f"{run_id}: {what or 'end'} not reached after {timeout} s: {states}")

    def wait_finished(self, dag_id: str, run_id: str, timeout: float = 1200) -> tuple[str, dict[str, dict]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(dag_id, run_id)
            if run["state"] in FINISHED:
                return run["state"], self.tasks(dag_id, run_id)
            time.sleep(2)
        raise TimeoutError(f"{run_id} still {run['state']} after {timeout} s")

    def respond(self, dag_id: str, run_id: str, task_id: str, option: str) -> dict:
        """Answer a human-in-the-loop task (the UI's Approve / Reject buttons)."""
        return self.call(
            "PATCH",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails",
            json={"chosen_options": [option], "params_input": {}},
        )


def states(tis: Mapping[str, dict]) -> dict[str, str | None]:
    return {task: ti["state"] for task, ti in tis.items()}


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root: run them as the Debian package's `postgres` user.
    # runuser lives in /usr/sbin, which a minimal PATH (`env -i PATH=/usr/bin:/bin`) leaves out.
    if os.geteuid() != 0:
        return argv
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    runuser = shutil.which("runuser", path=search)
    assert runuser, "runuser (util-linux) not found: PostgreSQL cannot be started as root without it"
    return [runuser, "-u", "postgres", "--", *argv]


def start_postgres(infra: Services, data: Path) -> str:
    """A throwaway PostgreSQL cluster in `data` on a free loopback port; returns the SQLAlchemy URL.

    `data` must be reachable by the `postgres` user when running as root (pytest's tmp dirs are not:
    use a fresh `tempfile.mkdtemp()`).
    """
    (bin_dir,) = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1:] or [None]
    assert bin_dir is not None, "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "airflow"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    argv = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(data)]
    argv += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
    infra.start_command("postgres", _as_postgres(argv), stop_signal=signal.SIGINT)  # SIGINT: fast shutdown
    wait_port(port)
    return f"postgresql+psycopg2://airflow@127.0.0.1:{port}/postgres"


def start_redis(infra: Services) -> str:
    """A Redis broker on a free loopback port, no persistence; returns its URL."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    infra.start_command("redis", argv)
    wait_port(port)
    return f"redis://127.0.0.1:{port}/0"
