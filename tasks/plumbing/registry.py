"""Read-only access to the model registry: the champion's version and its downloaded artifact tree.

Used by the evaluate stage (to compare against the champion), the demo, and the register stage (which
writes the registry; its write side lives in `tasks.stages.register`). A registered version's source is
one MLflow run's `model/` directory holding `adapter/`, `merged/`, `onnx/`, `reports/` and `README.md`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, read_json, write_json_atomic
from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.plumbing.tracking import setup_mlflow

log = logging.getLogger("qa_lora.registry")

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
TAG = "qa_lora."  # prefix of every tag the pipeline sets on versions and registered models
RUN_ID_TAG = f"{TAG}run_id"  # the pipeline run id: the idempotence key of a version
LOCK_TIMEOUT_S = 600.0
MARKER = ".qa_lora_champion.json"  # in fetch_champion's dest: which version is already there


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version an alias points at, or None (no such alias, or no such registered model).

    Args:
        client: an `mlflow.MlflowClient`.
        name: the registered model name.
        alias: the alias (e.g. "champion").

    Returns:
        The version number as a string, or None.

    Raises:
        MlflowException: any other registry error (never swallowed).
    """
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def fetch_champion(cfg: Config, dest: Path) -> dict[str, Any] | None:
    """Download the champion's artifact tree into `dest` (reused when it already holds that version).

    Args:
        cfg: the configuration (`register` section).
        dest: a local directory, replaced atomically by the champion's tree.

    Returns:
        None when there is no champion; else {"version", "run_id" (the pipeline run id), "merged_path",
        "onnx_path", "dataset_hash", "model_name", "path"}.

    Raises:
        UserError: the champion's downloaded tree is incomplete.
    """
    setup_mlflow(cfg)
    from mlflow import MlflowClient

    client = MlflowClient()
    name = cfg.register.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        log.info("no champion for %r yet", name)
        return None
    mv = client.get_model_version(name, version)  # by number: the alias may move while we download
    dest = Path(dest).resolve()
    _download_once(name, version, mv.source, dest)
    return {
        "model_name": name,
        "version": version,
        "run_id": mv.tags.get(RUN_ID_TAG),
        "path": str(dest),
        "merged_path": str(dest / "merged"),
        "onnx_path": str(dest / "onnx"),
        "dataset_hash": mv.tags.get(f"{TAG}dataset_hash"),
    }


@contextmanager
def fetched_champion(cfg: Config) -> Iterator[dict[str, Any] | None]:
    """:func:`fetch_champion` into the shared champion directory (beside the eval cache, kept and reused
    while that version stays champion), or, with the eval cache off, a temporary one removed on exit.

    Yields:
        What :func:`fetch_champion` returns (None: no champion).
    """
    if cfg.eval.cache_dir:
        yield fetch_champion(cfg, cfg.resolve(cfg.eval.cache_dir).parent / "champion")
        return
    with tempfile.TemporaryDirectory(prefix="qa-lora-champion-") as tmp:
        yield fetch_champion(cfg, Path(tmp) / "champion")


def _download_once(name: str, version: str, source: str, dest: Path) -> None:
    """`models:/name/version` into dest, unless dest's marker says it already holds exactly that."""
    from filelock import FileLock
    from mlflow.artifacts import download_artifacts

    marker = {"model_name": name, "version": version, "source": source}
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Two runs evaluating at once may share one dest (a cache); atomic_dir's temporary is per dest.
    with FileLock(str(dest.parent / f".{dest.name}.lock"), timeout=LOCK_TIMEOUT_S):
        if (dest / MARKER).is_file() and read_json(dest / MARKER) == marker:
            return
        log.info("downloading champion %r v%s to %s", name, version, dest)
        with atomic_dir(dest) as tmp:
            download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
            check_tree(tmp, f"models:/{name}/{version}")
            write_json_atomic(tmp / MARKER, marker)


# ------------------------------------------------------------------------------ artifact tree checks


def check_tree(root: Path, where: str) -> None:
    """A downloaded version tree is complete (the same checks as at registration).

    Raises:
        UserError: naming `where` and the first missing or incomplete part.
    """
    try:
        check_tree_parts(root / "adapter", root / "merged", root / "onnx")
    except UserError as exc:
        raise UserError(f"{where}: incomplete artifact tree: {exc}") from None


def check_tree_parts(adapter: Path, merged: Path, onnx_dir: Path) -> None:
    """Adapter, merged model (every listed shard) and ONNX kit are complete.

    Raises:
        UserError: naming the first missing or empty file.
    """
    for rel in ("adapter_config.json", "adapter_model.safetensors"):
        require_file(adapter / rel, "part of the LoRA adapter")
    for rel in ("config.json", "tokenizer_config.json"):
        require_file(merged / rel, "part of the merged model")
    index = merged / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        for shard in shards:
            require_file(merged / shard, f"a shard listed in {index.name}")
    else:
        require_file(merged / "model.safetensors", "the merged weights")
    _check_onnx_dir(onnx_dir)


def _check_onnx_dir(onnx_dir: Path) -> None:
    """The export's generation kit is there (graph, layout, tokenizer); every graph (variants in
    subdirectories too) loads without its weights and every external-data file it names is there."""
    from tasks.plumbing.onnx_generate import LAYOUT_FILE

    graphs = sorted(onnx_dir.rglob("*.onnx")) if onnx_dir.is_dir() else []
    if not graphs:
        raise UserError(f"{onnx_dir}: no .onnx graph (the export stage writes them; nothing registered)")
    for rel in (LAYOUT_FILE, "tokenizer_config.json"):
        require_file(onnx_dir / rel, "part of the ONNX export (onnxruntime generation needs it)")
    import onnx

    for graph in graphs:
        try:
            model = onnx.load(str(graph), load_external_data=False)
        except Exception as exc:  # a truncated or foreign file: name it, one line
            raise UserError(f"{graph}: not a readable ONNX model ({type(exc).__name__})") from None
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            data = graph.parent / info.get("location", "")
            need = int(info.get("offset", 0)) + int(info.get("length", 0))
            if not data.is_file() or data.stat().st_size < need:
                raise UserError(
                    f"{graph}: external data {info.get('location')!r} for {tensor.name!r} is missing or "
                    f"shorter than {need} bytes"
                )


def require_file(path: Path, what: str) -> None:
    """Raise UserError unless `path` is a non-empty file (`what` says what it should have been)."""
    if not path.is_file() or path.stat().st_size == 0:
        raise UserError(f"{path}: missing or empty; expected {what}")
