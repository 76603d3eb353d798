"""End-to-end fixtures: an isolated params overlay, registry, DVC remote and runs root per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Small but real: enough steps for the tiny model to beat its base, few eval rows, few parity prompts.
E2E_PARAMS = """\
extends: {repo}/params.yaml
data:
  dvc_remote: {tmp}/dvc-remote
train:
  max_steps: 120
  save_steps: 60
  logging_steps: 20
eval:
  max_rows: 80
  max_new_tokens: 32
  bootstrap_samples: 300
gate:
  min_slice_size: 1000   # 80 rows cannot support per-slice gating; the slice rule has its own tests
export:
  parity_prompts: 4
  parity_new_tokens: 8
register:
  tracking_uri: sqlite:///{tmp}/mlflow.db
runtime:
  run_dir: {tmp}/runs/cli
"""


@pytest.fixture(scope="session")
def e2e_home(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, tiny_base: Path) -> Path:
    """A temp dir with params.yaml overlay (`e2e.yaml`), the registry and the DVC remote of the session."""
    home = tmp_path_factory.mktemp("e2e")
    (home / "e2e.yaml").write_text(E2E_PARAMS.format(repo=repo_root, tmp=home), encoding="utf-8")
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
    )
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    return env
