"""The champion as an MLflow Model: a python_function flavor over the ONNX export (onnxruntime, no torch).

:func:`save_pyfunc_model` writes an MLflow Model directory (`MLmodel`, the code in `entry.py` + `code/`,
requirements, signature, input example) whose `onnx` artifact is the export's `onnx/` directory. The
register stage writes it into the version's tree beside `onnx/` (no second copy of the weights), so

    import mlflow
    model = mlflow.pyfunc.load_model("models:/qa-lora@champion")
    model.predict({"question": ["What does zip() return?"]}, params={"max_new_tokens": 64})

and `mlflow models serve -m models:/qa-lora@champion --env-manager local` work on any version.
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tasks.core.errors import UserError
from tasks.plumbing.chat import ChatFrame
from tasks.plumbing.ort_runtime import runtime_requirement
from tasks.plumbing.serving.predictor import Answerer, FastTokenizer, ServingLimits

__all__ = ["ONNX_DIR", "Answerer", "FastTokenizer", "ServingLimits", "pip_requirements", "save_pyfunc_model"]

ONNX_DIR = "onnx"  # where the model's ONNX artifact lies inside the MLflow Model directory
ENTRY = Path(__file__).with_name("entry.py")
PACKAGE = Path(__file__).resolve().parents[2]  # the `tasks` package, shipped as the model's code
EXAMPLE_QUESTION = "What does zip() return?"
# What `predict` imports (beside mlflow itself, which MLflow adds): pinned to this environment.
_PREDICT_IMPORTS = ("tokenizers", "numpy", "pandas")


def pip_requirements() -> list[str]:
    """Pins of what predict imports: the installed ONNX Runtime distribution, tokenizers, numpy, pandas.

    Raises:
        UserError: no (or several) ONNX Runtime distribution installed.
    """
    runtime = runtime_requirement()
    if runtime is None:
        raise UserError("onnxruntime: expected exactly one ONNX Runtime distribution installed to pin it")
    return [runtime, *(f"{name}=={md.version(name)}" for name in _PREDICT_IMPORTS)]


def signature(limits: ServingLimits) -> Any:
    """Input: a `question` string column; output: an `answer` string column; param `max_new_tokens`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "question")]),
        outputs=Schema([ColSpec(DataType.string, "answer")]),
        params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, limits.default_max_new_tokens)]),
    )


def save_pyfunc_model(
    path: Path, onnx_dir: Path, *, copy_onnx: bool = True, limits: ServingLimits | None = None
) -> Path:
    """Write an MLflow Model (python_function flavor) for the ONNX export `onnx_dir` into `path`.

    Args:
        path: a directory that does not exist yet (or is empty).
        onnx_dir: the export's `onnx/` directory (graph, weights, tokenizer, onnx_layout.json).
        copy_onnx: copy `onnx_dir` into `path/onnx` (a self-contained model); False when `path` is
            uploaded beside an `onnx/` directory already (the register stage), so weights go up once.
        limits: request limits, recorded in the MLmodel (`metadata.qa_lora_serving_limits`) and enforced
            by predict; default :class:`ServingLimits`.

    Returns:
        `path`.

    Raises:
        UserError: no single ONNX Runtime distribution to pin (see :func:`pip_requirements`).
    """
    import mlflow
    import pandas as pd

    limits = limits or ServingLimits()
    chat = ChatFrame.load(onnx_dir)  # the format predict renders with; checked again at every load
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="qa-lora-code-") as tmp:
        # A clean copy of the package: no bytecode caches in the model.
        code = Path(tmp) / PACKAGE.name
        shutil.copytree(PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(ENTRY),
            code_paths=[str(code)],
            model_config={**limits.to_dict(), "chat_fingerprint": chat.fingerprint},
            signature=signature(limits),
            input_example=pd.DataFrame({"question": [EXAMPLE_QUESTION]}),
            pip_requirements=pip_requirements(),
            metadata={
                "qa_lora_serving_limits": limits.to_dict(),
                "qa_lora_runtime": "onnxruntime",
                "qa_lora_chat": {k: v for k, v in asdict(chat).items() if k != "material"},
            },
        )
    _point_at_onnx(path)
    if copy_onnx:
        shutil.copytree(onnx_dir, path / ONNX_DIR)
    return path


def _point_at_onnx(path: Path) -> None:
    """Name `onnx/` (relative to the model directory) as the model's `onnx` artifact in its MLmodel.

    `save_model(artifacts=...)` would copy the weights into `artifacts/`; the register stage uploads
    them once as `onnx/`, so the MLmodel points there instead (the loader joins this path to the model's
    directory, as for any artifact).
    """
    from mlflow.models import Model
    from mlflow.pyfunc import FLAVOR_NAME

    mlmodel = Model.load(str(path))
    mlmodel.flavors[FLAVOR_NAME]["artifacts"] = {ONNX_DIR: {"path": ONNX_DIR, "uri": ONNX_DIR}}
    mlmodel.save(str(path / "MLmodel"))
