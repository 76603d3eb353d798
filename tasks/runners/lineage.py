"""OpenLineage events from every stage, whichever runner runs it (`qa-lora run`, `dvc repro`, the DAG).

Each stage run is an OpenLineage run (START, then COMPLETE or FAIL) of the job `<stage>` in
`lineage.namespace`, whose parent is the pipeline run: the Airflow task that ran it (the OpenLineage
provider's own run id for that task, so a catalog joins our events to the provider's DAG and task events),
or, outside Airflow, the run directory (one stable id per run, which groups `dvc repro`'s processes).
Inputs and outputs are named datasets with facets:

    validate  Q&A source -> validated split (row counts)
    version   validated split -> DVC dataset `qa-dataset` (version: its DVC hash, in the remote's namespace)
    train     DVC dataset version, base model -> adapter (version: its sha256)
    evaluate  adapter, DVC dataset version -> gate report (decision, rules and metrics facet)
    export    adapter, base model -> merged model, ONNX export
    register  ONNX export, DVC dataset version -> registered model version (gate facet beside it)

Events are the OpenLineage client's typed events, sent by its transports (`lineage.transport`): `file`
(default: `lineage.jsonl` in the runs root), `console` (the log), `http` (`lineage.url`: Marquez, DataHub;
an API key from OPENLINEAGE_API_KEY), `openlineage` (the client's own configuration: openlineage.yml or
OPENLINEAGE_* variables) or `none`. Inside an Airflow task whose OpenLineage provider has a transport
(AIRFLOW__OPENLINEAGE__TRANSPORT), the provider's client sends them, next to its own events. URIs are
redacted; an event that cannot be sent is logged and never fails the stage.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    DatasetFacet,
    dataset_version_dataset,
    error_message_run,
    output_statistics_output_dataset,
    parent_run,
)

from tasks.core.artifacts import read_json, sha256
from tasks.core.config import Config
from tasks.core.layout import RunLayout
from tasks.core.redact import redact, redact_uri

log = logging.getLogger("qa_lora.lineage")

PRODUCER = "https://github.com/qa-lora/qa-lora"
DATASET = "qa-dataset"  # the DVC dataset's name; its version is the hash


@attr.define
class QaLoraGateDatasetFacet(DatasetFacet):
    """The gate's decision on this candidate: pass or fail, each rule, the candidate's metrics."""

    passed: bool | None = None
    decision: str | None = None
    reasons: list[str] = attr.field(factory=list)
    rules: list[dict[str, Any]] = attr.field(factory=list)
    metrics: dict[str, float] = attr.field(factory=dict)
    championVersion: str | None = None  # OpenLineage facets are camelCase


@attr.define
class QaLoraRowsDatasetFacet(DatasetFacet):
    """The Q&A file the version was validated from: rows read, kept, dropped (by check)."""

    source: str = ""
    rowsIn: int | None = None
    rowsOut: int | None = None
    droppedByCheck: dict[str, int] = attr.field(factory=dict)


@attr.define
class QaLoraRegistryDatasetFacet(DatasetFacet):
    """Where the version is in the registry and what it became (aliases, promotion)."""

    uri: str = ""
    aliases: list[str] = attr.field(factory=list)
    promotion: str | None = None


@contextmanager
def stage_events(
    cfg: Config, stage: str, run_dir: Path, parent: dict[str, str] | None = None
) -> Iterator[dict]:
    """Emit START, then COMPLETE with the stage's inputs and outputs (or FAIL with the error).

    Args:
        cfg: the run's configuration (`lineage`, and what names the datasets).
        stage: the stage's name.
        run_dir: the run directory (its files give the datasets' facets).
        parent: {"namespace", "name", "run_id"} of the run that ran this stage (an Airflow task, with
            "root_run_id" and "root_name": its DAG run); None: the pipeline run of `run_dir`.

    Yields:
        A dict the caller puts the stage's result in (key "result") for the COMPLETE event.
    """
    if cfg.lineage.transport == "none":
        yield {}
        return
    run_dir = Path(run_dir)
    facets: dict[str, Any] = {"parent": _parent_facet(cfg, run_dir, parent)}
    run, job = Run(runId=str(uuid.uuid4()), facets=facets), Job(namespace=cfg.lineage.namespace, name=stage)
    _emit(cfg, run_dir, _event(RunState.START, run, job))
    holder: dict[str, Any] = {}
    try:
        yield holder
    except BaseException as exc:
        error = error_message_run.ErrorMessageRunFacet(
            message=redact(f"{type(exc).__name__}: {exc}")[:2000], programmingLanguage="python"
        )
        failed = Run(runId=run.runId, facets={**facets, "errorMessage": error})
        _emit(cfg, run_dir, _event(RunState.FAIL, failed, job))
        raise
    inputs, outputs = datasets(cfg, stage, run_dir, holder.get("result") or {})
    done = _event(
        RunState.COMPLETE,
        run,
        job,
        [InputDataset(**d) for d in inputs],
        [OutputDataset(**d) for d in outputs],
    )
    _emit(cfg, run_dir, done)


def _event(
    state: RunState, run: Run, job: Job, inputs: list | None = None, outputs: list | None = None
) -> RunEvent:
    now = datetime.now(UTC).isoformat()
    return RunEvent(eventType=state, eventTime=now, producer=PRODUCER, run=run, job=job,
                    inputs=inputs or [], outputs=outputs or [])  # fmt: skip


def _parent_facet(cfg: Config, run_dir: Path, parent: dict[str, str] | None) -> parent_run.ParentRunFacet:
    """The run that ran the stage (an Airflow task, under its DAG run) or the run directory's own run."""
    parent = parent or {
        "namespace": cfg.lineage.namespace,
        "name": "pipeline",
        "run_id": pipeline_run_id(run_dir),
    }
    root = None
    if "root_run_id" in parent:
        root = parent_run.Root(
            run=parent_run.RootRun(runId=parent["root_run_id"]),
            job=parent_run.RootJob(namespace=parent["namespace"], name=parent["root_name"]),
        )
    return parent_run.ParentRunFacet(
        run=parent_run.Run(runId=parent["run_id"]),
        job=parent_run.Job(namespace=parent["namespace"], name=parent["name"]),
        root=root,
    )


def pipeline_run_id(run_dir: Path) -> str:
    """One stable UUID per run directory: every stage of a run has it as parent, in every process."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, Path(run_dir).resolve().as_uri()))


def airflow_task_parent() -> dict[str, str] | None:
    """This Airflow task's OpenLineage run as the provider names it, with its DAG run as the root; None
    outside a task (or without the provider)."""
    from airflow.sdk import get_current_context

    try:
        from airflow.providers.openlineage.plugins import macros

        ti = get_current_context()["ti"]
    except (ImportError, RuntimeError):
        return None
    return {
        "namespace": macros.lineage_job_namespace(),
        "name": macros.lineage_job_name(ti),
        "run_id": macros.lineage_run_id(ti),
        "root_name": macros.lineage_root_job_name(ti),
        "root_run_id": macros.lineage_root_run_id(ti),
    }


def datasets(cfg: Config, stage: str, run_dir: Path, result: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of a finished stage: keyword arguments of InputDataset / OutputDataset."""
    layout = RunLayout.of(run_dir)
    split = _file(layout.data_dir, rows=result.get("rows_out"))
    base = {"namespace": "huggingface" if cfg.base.kind == "hub" else "file", "name": cfg.base.name_or_path}
    weights = layout.adapter_dir / "adapter_model.safetensors"
    adapter = _file(layout.adapter_dir, version=sha256(weights) if weights.is_file() else None)
    onnx = _file(layout.onnx_dir)
    table = {
        "validate": ([_file(Path(cfg.resolve(cfg.data.source)))], [split]),
        "version": ([_file(layout.data_dir)], [_dvc(cfg, layout)]),
        "train": ([_dvc(cfg, layout), base], [adapter]),
        "evaluate": ([adapter, _dvc(cfg, layout)], [_gate(layout)]),
        "export": ([adapter, base], [_file(layout.merged_dir), onnx]),
        "register": ([onnx, _dvc(cfg, layout)], [_model_version(cfg, layout, result)]),
    }
    inputs, outputs = table.get(stage, ([], []))
    return [{k: v for k, v in d.items() if k != "outputFacets"} for d in inputs], outputs


def _file(path: Path, rows: int | None = None, version: str | None = None) -> dict[str, Any]:
    dataset: dict[str, Any] = {"namespace": "file", "name": str(Path(path).resolve()), "facets": {}}
    if rows is not None:
        stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=int(rows))
        dataset["outputFacets"] = {"outputStatistics": stats}
    if version:
        dataset["facets"]["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
            datasetVersion=version
        )
    return dataset


def _dvc(cfg: Config, layout: RunLayout) -> dict[str, Any]:
    """The DVC dataset version the run's data is (namespace: the remote, redacted; version: the hash)."""
    info = read_json(layout.version_file) if layout.version_file.is_file() else {}
    version = dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=str(info.get("dataset_hash")))
    remote = redact_uri(str(info.get("remote") or cfg.data.dvc_remote))
    facets: dict[str, Any] = {"version": version}
    if layout.data_quality.is_file():  # the Q&A file's rows behind this version
        report = read_json(layout.data_quality)
        counts = report.get("counts") or {}
        facets["qa_lora_rows"] = QaLoraRowsDatasetFacet(
            source=redact_uri(str(report.get("source", ""))),
            rowsIn=counts.get("rows_in"),
            rowsOut=counts.get("rows_out"),
            droppedByCheck=dict(counts.get("dropped_by_check") or {}),
        )
    return {"namespace": f"dvc+{remote}", "name": DATASET, "facets": facets}


def _gate(layout: RunLayout) -> dict[str, Any]:
    dataset = _file(layout.gate_file)
    dataset["facets"]["qa_lora_gate"] = _gate_facet(layout)
    return dataset


def _gate_facet(layout: RunLayout) -> QaLoraGateDatasetFacet:
    gate = read_json(layout.gate_file) if layout.gate_file.is_file() else {}
    rules = [{k: r.get(k) for k in ("name", "passed", "value", "threshold")} for r in gate.get("rules", [])]
    candidate = (gate.get("metrics") or {}).get("candidate") or {}
    metrics = {k: float(v) for k, v in candidate.items() if isinstance(v, int | float)}
    champion = gate.get("champion_version")
    return QaLoraGateDatasetFacet(passed=gate.get("passed"), decision=gate.get("decision"),
                                  reasons=list(gate.get("reasons", [])), rules=rules, metrics=metrics,
                                  championVersion=None if champion is None else str(champion))  # fmt: skip


def _model_version(cfg: Config, layout: RunLayout, result: dict[str, Any]) -> dict[str, Any]:
    """The registered model version (namespace: the registry, redacted; version: its number)."""
    version = str(result.get("version"))
    facets = {
        "version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=version),
        "qa_lora_gate": _gate_facet(layout),
        "qa_lora_registry": QaLoraRegistryDatasetFacet(uri=f"models:/{cfg.register.model_name}/{version}",
                                                       aliases=list(result.get("aliases", [])),
                                                       promotion=result.get("promotion")),
    }  # fmt: skip
    namespace = f"mlflow+{redact_uri(str(result.get('tracking_uri') or cfg.register.tracking_uri))}"
    return {"namespace": namespace, "name": cfg.register.model_name, "facets": facets}


def _emit(cfg: Config, run_dir: Path, event: RunEvent) -> None:
    """Send through the configured client; a failure is logged (lineage never fails a stage)."""
    try:
        _client(cfg, run_dir).emit(event)
    except Exception as exc:
        log.error(
            "OpenLineage %s event of %s not sent: %s", event.eventType, event.job.name, redact(str(exc))
        )


def _client(cfg: Config, run_dir: Path) -> Any:
    """The Airflow provider's client inside a task where it has a transport; else lineage.transport's."""
    from openlineage.client import OpenLineageClient

    if os.environ.get("AIRFLOW_CTX_DAG_ID"):  # inside an Airflow task
        from airflow.providers.openlineage import conf
        from airflow.providers.openlineage.plugins.adapter import OpenLineageAdapter

        if conf.transport() and not conf.is_disabled():  # env or airflow.cfg [openlineage] transport
            return OpenLineageAdapter().get_or_create_openlineage_client()
    transport: dict[str, Any] = {
        "file": {
            "type": "file",
            "log_file_path": str(run_dir.resolve().parent / "lineage.jsonl"),
            "append": True,
        },
        "console": {"type": "console"},
        "http": {"type": "http", "url": str(cfg.lineage.url)},
    }.get(cfg.lineage.transport, {})
    if transport.get("type") == "http" and (key := os.environ.get("OPENLINEAGE_API_KEY")):
        transport["auth"] = {"type": "api_key", "apiKey": key}
    return OpenLineageClient(config={"transport": transport}) if transport else OpenLineageClient()
