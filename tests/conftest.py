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

# Airflow reads its home at import: a throwaway one per test session, our dags/ only, no examples.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="qa-lora-airflow-"))
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
