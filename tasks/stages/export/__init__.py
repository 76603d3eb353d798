"""The export stage (see stage.py for what it does, step by step)."""

from tasks.stages.export.stage import export_model

__all__ = ["export_model"]
