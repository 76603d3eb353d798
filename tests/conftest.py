"""Shared fixtures. Offline and analytics-free for every test; the tiny base is built once and cached."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before any test imports a library that reads them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# Airflow reads its home at import: a throwaway one per test session, our dags/ only, no examples. Each
# xdist worker (`make test` runs two) gets its own: they inherit the controller's environment.
if os.environ.get("PYTEST_XDIST_WORKER") or "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="qa-lora-airflow-")

# Each xdist worker runs on its own share of the CPUs, and so do its subprocesses (Airflow's services and
# tasks, the stages): torch, OpenMP and ONNX Runtime size their thread pools from it. Without it, two
# workers' thread pools spin on the same cores, and what one worker times side by side (the export's
# serving cost of candidate vs champion) measures the other worker's load instead.
if os.environ.get("PYTEST_XDIST_WORKER") and hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _index = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))
    if _workers <= len(_cpus):
        os.sched_setaffinity(0, _cpus[_index::_workers])
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The embedded tiny base model (params.yaml recipe), built once into models/tiny-base and reused."""
    from tasks.core.config import load_config
    from tasks.plumbing.base import build_base_model

    result = build_base_model(load_config())
    return Path(result["path"])


# `make test` runs two pytest-xdist workers on 2+ CPUs (see the Makefile): most of the suite
# is single-threaded Python (process start-up, imports, graph tracing, services' polling).
# A unit of work is one test file (its module fixtures, and tests that run in file order, stay in one
# process), except tests/reliability, one unit: its files share the session's `journey` (built once).
# The units measured longest (seconds, one worker) start first; the many short ones fill the end.
LONGEST_FIRST = (
    "tests/reliability",  # 420: the journey, kills, the S3 store, secrets
    "tests/e2e/test_dvc_e2e.py",  # 290
    "tests/e2e/test_airflow_services.py",  # 237
    "tests/e2e/test_airflow_e2e.py",  # 190
    "tests/model/test_multinode.py",  # 190: three 2-node trainings, one restarted
    "tests/model/test_fsdp.py",  # 170: four 2-process trainings and an export
    "tests/e2e/test_airflow_services_celery.py",  # 121
)


def work_unit(nodeid: str) -> str:
    """The unit of work (for xdist) a test belongs to."""
    path = nodeid.split("::")[0]
    return "tests/reliability" if path.startswith("tests/reliability/") else path


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Schedule by :func:`work_unit` (xdist's own `--dist loadgroup` marks are lost under pytest 9.2)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In an xdist worker: the units in LONGEST_FIRST first (the scheduler hands units out in collection
    order); a plain `pytest` keeps the collection order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    first = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(work_unit(item.nodeid), len(first)))
