"""What the evaluate stage's parts pass each other: the model names, one evaluation's results."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasks.core.config import Config

MODELS = ("base", "candidate", "champion")

# The per-model numbers shown side by side (models.csv for `dvc plots`, and the report's table).
TABLE_COLUMNS = (
    "exact_match",
    "token_f1",
    "rouge_l",
    "loss",
    "perplexity",
    "eos_rate",
    "empty_rate",
    "distinct_answer_share",
    "top_answer_share",
    "answer_words_mean",
)

Results = Mapping[str, list[dict[str, Any]] | None]  # per model (MODELS), per-row results or None


@dataclass(frozen=True)
class Evaluation:
    """Everything one evaluation produced, as the writers and the report read it.

    Attributes:
        rows: the eval rows, in scoring order.
        results: per model, its per-row results (None for a model not scored: no champion).
        summary: per model, `metrics.aggregate` of its results (or None).
        gate: `metrics.decide_gate`'s decision.
        model_cis: per scored model, the bootstrap CI of each primary metric's mean.
        champion: the champion record the candidate was compared against, or None.
        timings: seconds per step.
    """

    rows: list[dict[str, str]]
    results: Results
    summary: Mapping[str, dict[str, float] | None]
    gate: dict[str, Any]
    model_cis: dict[str, Any]
    champion: Mapping[str, Any] | None
    timings: Mapping[str, float]


def finite(value: Any) -> Any:
    """JSON-safe number: NaN/inf become None (they are not valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def gated_metrics(cfg: Config) -> list[str]:
    """The primary metrics and the gate's metric, each once, in order."""
    return list(dict.fromkeys([*cfg.eval.primary_metrics, cfg.gate.primary_metric]))
