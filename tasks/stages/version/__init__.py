"""The version stage (see stage.py for what it does, step by step)."""

from tasks.stages.version.stage import fetch_dataset, version_dataset

__all__ = ["fetch_dataset", "version_dataset"]
