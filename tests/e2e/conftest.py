"""End-to-end fixtures: an isolated params overlay, registry, DVC remote and runs root per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from small_run import write_overlay


@pytest.fixture(scope="session")
def e2e_home(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, tiny_base: Path) -> Path:
    """A temp dir with params.yaml overlay (`e2e.yaml`), the registry and the DVC remote of the session."""
    home = tmp_path_factory.mktemp("e2e")
    sections = {
        "data": {"dvc_remote": str(home / "dvc-remote")},
        "register": {"tracking_uri": f"sqlite:///{home}/mlflow.db"},
        "runtime": {"run_dir": str(home / "runs" / "cli")},
    }
    write_overlay(home / "e2e.yaml", repo_root, sections)
    return home


@pytest.fixture(scope="session")
def airflow_env(e2e_home: Path, repo_root: Path) -> dict[str, str]:
    """Environment for `airflow` subprocesses: migrated SQLite DB, our DAGs, the e2e params and runs root."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(e2e_home / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(repo_root / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        QA_LORA_PARAMS=str(e2e_home / "e2e.yaml"),
        QA_LORA_RUNS_ROOT=str(e2e_home / "runs"),
        # the OpenLineage provider's transport: its DAG and task events, and ours, into the runs root
        AIRFLOW__OPENLINEAGE__TRANSPORT=json.dumps(
            {"type": "file", "log_file_path": str(e2e_home / "runs" / "lineage.jsonl"), "append": True}
        ),
        AIRFLOW__OPENLINEAGE__NAMESPACE="qa-lora",
    )
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    return env
