"""The train stage (see stage.py for what it does, step by step)."""

from tasks.stages.train.stage import train_adapter

__all__ = ["train_adapter"]
