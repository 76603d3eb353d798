"""The evaluate stage (see stage.py for what it does, step by step)."""

from tasks.stages.evaluate.stage import evaluate_candidate

__all__ = ["evaluate_candidate"]
