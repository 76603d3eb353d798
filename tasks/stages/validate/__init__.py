"""The validate stage (see stage.py for what it does, step by step)."""

from tasks.stages.validate.stage import validate_dataset

__all__ = ["validate_dataset"]
