"""The TaskFlow tasks both DAGs share (qa_lora_finetune and qa_lora_sweep), each a call into
tasks.runners.airflow. Only DAG files import this module: it imports the Airflow SDK at top level."""

from __future__ import annotations

from airflow.sdk import BaseNotifier, task

from tasks.runners import airflow as ds


@task
def validate(run: dict) -> dict:
    return ds.execute_stage("validate", run)


@task(retries=3, retry_exponential_backoff=2.0)  # the DVC remote may be briefly unavailable
def version(run: dict, _validated: dict) -> dict:
    return ds.execute_stage("version", run)


# Only the direct downstream is skipped: the rest follow their trigger rules, so `retention` still runs.
@task.short_circuit(ignore_downstream_trigger_rules=False)
def gate(run: dict, _evaluated: dict) -> bool:
    return ds.check_gate(run)


@task
def export(run: dict) -> dict:  # merge + ONNX export + parity checks
    return ds.execute_stage("export", run)


@task(retries=3, retry_exponential_backoff=2.0)  # the registry may be briefly unavailable
def register(run: dict, _exported: dict) -> dict:
    return ds.execute_stage("register", run)


@task(trigger_rule="none_failed")  # after a refused or a promoted candidate alike; never after a failure
def retention(run: dict) -> dict:
    return ds.retain(run)


class ApprovalWaiting(BaseNotifier):
    """The approval task's notifier: tells orchestrate.notify that a candidate waits for a person."""

    def notify(self, context) -> None:
        ds.tell_approval_waiting(dict(context))
