"""The register stage: `register_model` (stage.py), champion moves (champion.py), the MLflow upload
(upload.py) and the run's lineage (lineage.py). `fetch_champion` lives in tasks.plumbing.registry."""

from tasks.plumbing.registry import fetch_champion
from tasks.stages.register.champion import promote_version, rollback_champion
from tasks.stages.register.retention import prune_versions
from tasks.stages.register.stage import promote_run, register_model

__all__ = [
    "fetch_champion",
    "promote_run",
    "promote_version",
    "prune_versions",
    "register_model",
    "rollback_champion",
]
