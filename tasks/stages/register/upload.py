"""The MLflow side of a registration: one uploaded run per pipeline run, and its model version.

What a version carries: one MLflow run per pipeline run, whose artifact directory `model/` holds
`adapter/`, `merged/`, `onnx/`, `reports/` (gate, metrics, summaries, data quality, effective params)
and the model card as `README.md`, plus an `MLmodel` (python_function flavor over `onnx/`, see
tasks.plumbing.serving). The version's source is that directory, so downloading `models:/NAME@champion`
gives back the whole tree, and `mlflow.pyfunc.load_model` / `mlflow models serve` run it. (`mlflow.register_model("runs:/...")` expects an
MLflow-flavoured model; `create_model_version(source=<artifact uri>)` registers a plain tree.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tasks.core.artifacts import disk_space
from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout
from tasks.core.redact import redact
from tasks.plumbing.registry import RUN_ID_TAG
from tasks.plumbing.tracking import artifact_store_errors
from tasks.stages.register.lineage import key_metrics, optional_reports, serving_figures

log = logging.getLogger("qa_lora.register")

ARTIFACT_PATH = "model"  # the one artifact directory of the MLflow run that a version points at
READY_TIMEOUT_S = 300  # a file/SQLite store is READY at once; a server may copy first


def upload_run(
    client: Any, cfg: Config, layout: RunLayout, lineage: dict[str, str], gate: dict[str, Any]
) -> tuple[str, str]:
    """One finished MLflow run holding the artifact tree; an earlier finished upload is reused.

    Runs outside the registry lock: uploading a 7B merged model takes minutes and needs no lock, and
    a crashed attempt leaves an unfinished run that is simply not reused.

    Returns:
        (MLflow run id, artifact URI of the tree that a version points at).
    """
    run_id = lineage[RUN_ID_TAG]
    exp_id = client.get_experiment_by_name(cfg.register.experiment).experiment_id
    done = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if done:
        log.info("reusing the finished MLflow run %s for %s", done[0].info.run_id, run_id)
        return done[0].info.run_id, f"{done[0].info.artifact_uri}/{ARTIFACT_PATH}"
    run = client.create_run(exp_id, tags=lineage, run_name=f"register-{run_id}")
    rid = run.info.run_id
    try:
        t0 = time.monotonic()
        with artifact_store_errors(cfg.register.artifact_location), _room_for(run.info.artifact_uri, layout):
            _log_tree(client, rid, cfg, layout, gate)
        log.info("uploaded the artifact tree in %.1fs", time.monotonic() - t0)
    except BaseException:
        client.set_terminated(rid, status="FAILED")
        _drop_partial_upload(run.info.artifact_uri)
        raise
    client.set_terminated(rid, status="FINISHED")
    return rid, f"{run.info.artifact_uri}/{ARTIFACT_PATH}"


def _room_for(artifact_uri: str, layout: RunLayout) -> Any:
    """A local artifact store: refuse a filesystem without room for the tree, and a full disk in one line."""
    from contextlib import nullcontext
    from urllib.parse import urlparse

    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("", "file"):
        return nullcontext()  # a remote store reports its own limits (artifact_store_errors)
    parts = (layout.adapter_dir, layout.merged_dir, layout.onnx_dir, layout.eval_dir)
    needed = sum(f.stat().st_size for part in parts for f in part.rglob("*") if f.is_file())
    return disk_space(Path(parsed.path), needed, "the registered artifacts (adapter, merged, ONNX, reports)")


def _drop_partial_upload(artifact_uri: str) -> None:
    """A failed upload's files go: they belong to no version and would only fill the store."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(artifact_uri).delete_artifacts()
    except Exception as exc:  # the upload's own error is the one to report
        log.warning("could not delete the failed upload at %s: %s", redact(artifact_uri), redact(str(exc)))


def _log_tree(client: Any, rid: str, cfg: Config, layout: RunLayout, gate: dict[str, Any]) -> None:
    """adapter/, merged/, onnx/, README.md and reports/ into the run; key metrics and params beside."""
    from mlflow.entities import Metric, Param

    for part, src in (
        ("adapter", layout.adapter_dir),
        ("merged", layout.merged_dir),
        ("onnx", layout.onnx_dir),
    ):
        client.log_artifacts(rid, str(src), f"{ARTIFACT_PATH}/{part}")
    _log_pyfunc(client, rid, layout)
    client.log_artifact(rid, str(layout.model_card), ARTIFACT_PATH)
    reports = f"{ARTIFACT_PATH}/reports"
    client.log_artifacts(rid, str(layout.eval_dir), f"{reports}/eval")
    for path in (layout.version_file, layout.export_summary, *optional_reports(layout)):
        if path.is_file():
            client.log_artifact(rid, str(path), reports)
    now = int(time.time() * 1000)
    flat = {f"{s}.{k}": v for s in ("lora", "train") for k, v in cfg.to_dict()[s].items()}
    client.log_batch(
        rid,
        metrics=[
            *(Metric(k, v, now, 0) for k, v in key_metrics(gate).items()),
            *(Metric(f"serving.{k}", v, now, 0) for k, v in serving_figures(layout).items()),
        ],
        params=[Param(k, str(v)[:6000]) for k, v in flat.items()],
    )


def _log_pyfunc(client: Any, rid: str, layout: RunLayout) -> None:
    """An MLmodel (python_function over the `onnx/` beside it: tasks.plumbing.serving) into the tree, so
    `mlflow.pyfunc.load_model("models:/NAME@champion")` and `mlflow models serve` work on the version."""
    import tempfile

    from tasks.plumbing.serving import save_pyfunc_model

    with tempfile.TemporaryDirectory(prefix="qa-lora-pyfunc-") as tmp:
        model_dir = save_pyfunc_model(Path(tmp) / "pyfunc", layout.onnx_dir, copy_onnx=False)
        client.log_artifacts(rid, str(model_dir), ARTIFACT_PATH)


def ensure_registered_model(client: Any, name: str, description: str) -> None:
    """Create the registered model (with `description`) unless it exists."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description=description)


def find_or_create_version(
    client: Any, name: str, source: str, mlflow_run_id: str, tags: dict[str, str]
) -> tuple[Any, bool]:
    """The version tagged with this pipeline run id, or a new one (call under the registry lock).

    Returns:
        (the ModelVersion, whether it was created now).

    Raises:
        UserError: the new version did not become READY.
    """
    run_id = tags[RUN_ID_TAG]
    found = client.search_model_versions(f"name = '{name}' and tags.`{RUN_ID_TAG}` = '{run_id}'")
    if found:
        mv = min(found, key=lambda v: int(v.version))
        log.info("run %s is already version %s of %r", run_id, mv.version, name)
        return mv, False
    from mlflow.exceptions import MlflowException

    try:  # the store waits for READY itself (a file/SQLite store is READY at once; a server may copy)
        mv = client.create_model_version(
            name,
            source=source,
            run_id=mlflow_run_id,
            tags=tags,
            description=f"pipeline run {run_id}",
            await_creation_for=READY_TIMEOUT_S,
        )
    except MlflowException as exc:
        if "READY" not in exc.message and "creation failed" not in exc.message:
            raise
        raise UserError(f"models:/{name}: the new version did not become READY ({exc.message})") from None
    log.info("created version %s of %r from %s", mv.version, name, source)
    return mv, True


def get_version(client: Any, name: str, version: str) -> Any:
    """The ModelVersion `version` of `name`.

    Raises:
        UserError: it does not exist (other registry errors propagate).
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"register.model_name={name!r}: version {version!r} does not exist") from None
        raise
