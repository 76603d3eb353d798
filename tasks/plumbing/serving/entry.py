"""The MLflow model's code (models-from-code): MLflow runs this file when it loads the model.

Not imported by the pipeline: `save_pyfunc_model` (tasks.plumbing.serving) logs this file beside a copy
of the `tasks` package (`code/`), and `mlflow.pyfunc.load_model` executes it, which registers
:class:`QaLoraOnnxModel` with `mlflow.models.set_model`. Loading and predicting import numpy, pandas,
onnxruntime and `tokenizers` only (no torch, no transformers).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from tasks.core.errors import UserError
from tasks.plumbing.serving.predictor import Answerer, ServingLimits

QUESTION, ANSWER, ONNX_ARTIFACT = "question", "answer", "onnx"


def questions_of(model_input: Any) -> list[Any]:
    """The questions of a request: a DataFrame's `question` column (its cells may hold lists of
    questions), a dict with a `question` key, a list of strings or one string.

    Raises:
        UserError: no `question` column (or key).
    """
    if isinstance(model_input, pd.DataFrame):
        if QUESTION not in model_input.columns:
            raise UserError(f"input: no {QUESTION!r} column (got {list(model_input.columns)})")
        # MLflow's schema enforcement turns `{"question": [q1, q2]}` into one row holding the list.
        return _flatten(model_input[QUESTION].tolist())
    if isinstance(model_input, dict):
        if QUESTION not in model_input:
            raise UserError(f"input: no {QUESTION!r} key (got {sorted(model_input)})")
        value = model_input[QUESTION]
        return list(value) if isinstance(value, list | tuple) else [value]
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


def _flatten(cells: list[Any]) -> list[Any]:
    out: list[Any] = []
    for cell in cells:
        out.extend(list(cell) if isinstance(cell, list | tuple | np.ndarray) else [cell])
    return out


class QaLoraOnnxModel(PythonModel):
    """python_function flavor: greedy answers from the ONNX export with its KV cache, on onnxruntime."""

    def load_context(self, context: Any) -> None:
        """Open the ONNX session and tokenizer from the model's `onnx` artifact."""
        limits = ServingLimits.from_dict(context.model_config)
        self.answerer = Answerer(
            context.artifacts[ONNX_ARTIFACT],
            limits=limits,
            chat_fingerprint=(context.model_config or {}).get("chat_fingerprint"),
        )

    # `model_input` is annotated with a type MLflow derives no signature from (the signature is given
    # explicitly when the model is saved); left bare, MLflow warns "Add type hints" at every load.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Answers, one row per question, in an `answer` column.

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE (HTTP 400 when served) for a request outside the
                recorded limits or without questions.
        """
        budget = (params or {}).get("max_new_tokens")
        try:
            answers = self.answerer.answer(questions_of(model_input), None if budget is None else int(budget))
        except UserError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return pd.DataFrame({ANSWER: answers})


mlflow.models.set_model(QaLoraOnnxModel())
