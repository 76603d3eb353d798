"""The register stage (see stage.py for what it does, step by step)."""

from tasks.stages.register.stage import (
    fetch_champion,
    promote_run,
    promote_version,
    register_model,
    rollback_champion,
)

__all__ = ["fetch_champion", "promote_run", "promote_version", "register_model", "rollback_champion"]
