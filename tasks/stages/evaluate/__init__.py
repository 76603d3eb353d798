"""The evaluate stage: base vs candidate vs the registry's champion, and the regression gate.

Parts: stage.py (the entry and the per-model reuse), scoring.py (loading a model, loss, generation),
metrics.py (answer metrics, bootstrap, gate rules), outputs.py and report.py (what eval/ holds).
"""

from tasks.stages.evaluate.stage import evaluate_against, evaluate_candidate

__all__ = ["evaluate_against", "evaluate_candidate"]
