"""The version stage (see stage.py for what it does, step by step)."""

from tasks.stages.version.stage import REMOTE_NAME, fetch_dataset, prune_snapshots, version_dataset

__all__ = ["REMOTE_NAME", "fetch_dataset", "prune_snapshots", "version_dataset"]
