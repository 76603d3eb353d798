"""
# qa_lora_finetune

Keeps the Q&A model current: **validate** the Q&A dataset (Great Expectations) -> **version** it (DVC)
-> **train** a LoRA adapter (TRL + PEFT; on the MI300X node in production) -> **evaluate** against base
and champion -> **gate** -> **export** (merge, ONNX, parity) -> **register** (MLflow) -> [approval]
-> **retention** (old runs, their registry versions and DVC cache objects; `runtime.keep_runs`).

* Scheduled (cron in `params.yaml: orchestrate.schedule`) and data-aware: a producer that updates the
  `qa_lora_dataset` Asset triggers a run.
* Manual: *Trigger DAG w/ config* shows a form; defaults come from `params.yaml`, and the effective
  config is saved as `runs/<run id>/params.effective.yaml`.
* A failed gate skips export and register (with the reasons in the `gate` task log), or fails the run
  when `gate_on_fail` is `fail`. Nothing is registered from a failed gate.
* Every artifact lives under `runs/<run id>/`; XCom carries only paths, hashes and metrics.
* Who is told (`orchestrate.notify`): a failed run, a refused candidate, a new champion, an approval
  waiting, by email (an Airflow SMTP connection) or Slack; every notice is in `runs/notifications.jsonl`.

This file only wires: the stage code is `tasks/` (plain Python, also run by `qa-lora` and `dvc repro`).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import chain, dag

from tasks.runners.airflow import (
    DAG_ID,
    MAX_ACTIVE_RUNS,
    dataset_asset,
    default_config,
    notify,
    schedule_for,
    trigger_params,
)
from tasks.runners.airflow_tasks import evaluate, gate_to_retention, prepare, train, validate, version

CFG = default_config()


@dag(
    dag_id=DAG_ID,
    description="LoRA fine-tuning of the Q&A model: validate, version, train, evaluate, gate, export, register",
    doc_md=__doc__,
    schedule=schedule_for(CFG, dataset_asset(CFG)),
    # No start_date: with one, Airflow ignores the timetable's run_immediately and unpausing the DAG
    # starts a run for the latest past cron slot (a full training nobody asked for).
    catchup=False,
    max_active_runs=MAX_ACTIVE_RUNS,
    params=trigger_params(CFG),
    tags=["qa-lora", "llm", "lora", "mlops"],
    default_args={
        "owner": "ml-platform",
        "retries": 1,
        "retry_delay": timedelta(minutes=1),
        "execution_timeout": timedelta(minutes=CFG.orchestrate.stage_timeout_minutes),
    },
    on_success_callback=notify,
    on_failure_callback=notify,
)
def qa_lora_finetune() -> None:
    run = prepare()
    chain(validate(run), version(run), train(run), evaluate(run), *gate_to_retention(run))


qa_lora_finetune()
