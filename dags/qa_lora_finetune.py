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

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import dag, get_current_context, task

from tasks.runners import airflow as ds
from tasks.runners.airflow_tasks import ApprovalWaiting, export, gate, register, retention, validate, version

CFG = ds.default_config()
STAGE_TIMEOUT = timedelta(minutes=CFG.orchestrate.stage_timeout_minutes)
DATASET = ds.dataset_asset(CFG)


@dag(
    dag_id=ds.DAG_ID,
    description="LoRA fine-tuning of the Q&A model: validate, version, train, evaluate, gate, export, register",
    doc_md=__doc__,
    schedule=ds.schedule_for(CFG, DATASET),
    # No start_date: with one, Airflow ignores the timetable's run_immediately and unpausing the DAG
    # starts a run for the latest past cron slot (a full training nobody asked for).
    catchup=False,
    max_active_runs=ds.MAX_ACTIVE_RUNS,
    params=ds.trigger_params(CFG),
    tags=["qa-lora", "llm", "lora", "mlops"],
    default_args={
        "owner": "ml-platform",
        "retries": 1,
        "retry_delay": timedelta(minutes=1),
        "execution_timeout": STAGE_TIMEOUT,
    },
    on_success_callback=ds.notify,
    on_failure_callback=ds.notify,
)
def qa_lora_finetune() -> None:
    @task
    def prepare() -> dict:
        ctx = get_current_context()
        return ds.start_run(dict(ctx["params"]), ctx["run_id"])

    @task(**ds.train_task_kwargs(CFG))
    def train(run: dict, _versioned: dict) -> dict:
        return ds.execute_stage("train", run)

    @task
    def evaluate(run: dict, _trained: dict) -> dict:
        return ds.execute_stage("evaluate", run)

    @task.short_circuit(ignore_downstream_trigger_rules=False)  # skips the approval; retention still runs
    def approval_required(run: dict, _registered: dict) -> bool:
        return ds.approval_required(run)

    approve = ApprovalOperator(
        task_id="approve_promotion",
        subject="Promote the new qa-lora model to champion?",
        body="The candidate passed the gate and is registered as `candidate`. "
        "Review runs/{{ run_id }}/eval/eval_report.md, then approve to make it the champion.",
        response_timeout=timedelta(days=3),
        notifiers=[ApprovalWaiting()],
    )

    @task
    def promote(run: dict) -> dict:
        return ds.promote_after_approval(run)

    run = prepare()
    evaluated = evaluate(run, train(run, version(run, validate(run))))
    exported = export(run)
    gate(run, evaluated) >> exported
    approval_required(run, register(run, exported)) >> approve >> promote(run) >> retention(run)


qa_lora_finetune()
