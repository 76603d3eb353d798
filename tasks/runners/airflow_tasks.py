"""The TaskFlow tasks of the DAGs (qa_lora_finetune and qa_lora_sweep), each one call into
tasks.runners.airflow. Every task takes the run (prepare's small JSON); the DAG files order them with
`chain`, in the order of the pipeline diagram. Only DAG files import this module: it imports the Airflow
SDK at top level and reads params.yaml for the train task's routing (queue, pool, pod, retries)."""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseNotifier, get_current_context, task

from tasks.runners import airflow as runner

TRAIN_ROUTING = runner.train_task_kwargs(runner.default_config())


@task
def prepare() -> dict:
    ctx = get_current_context()
    return runner.start_run(dict(ctx["params"]), ctx["run_id"])


@task
def validate(run: dict) -> dict:
    return runner.execute_stage("validate", run)


@task(retries=3, retry_exponential_backoff=2.0)  # the DVC remote may be briefly unavailable
def version(run: dict) -> dict:
    return runner.execute_stage("version", run)


@task(**TRAIN_ROUTING)  # to the GPU node (Celery queue or Kubernetes pod), resuming from checkpoints on retry
def train(run: dict) -> dict:
    return runner.execute_stage("train", run)


@task
def evaluate(run: dict) -> dict:
    return runner.execute_stage("evaluate", run)


# Only the direct downstream is skipped: the rest follow their trigger rules, so `retention` still runs.
@task.short_circuit(ignore_downstream_trigger_rules=False)
def gate(run: dict) -> bool:
    return runner.check_gate(run)


@task
def export(run: dict) -> dict:  # merge + ONNX export + parity checks
    return runner.execute_stage("export", run)


@task(retries=3, retry_exponential_backoff=2.0)  # the registry may be briefly unavailable
def register(run: dict) -> dict:
    return runner.execute_stage("register", run)


@task.short_circuit(ignore_downstream_trigger_rules=False)  # skips the approval; retention still runs
def approval_required(run: dict) -> bool:
    return runner.approval_required(run)


def approve() -> ApprovalOperator:
    """The human-in-the-loop step (Airflow's HITL): Approve promotes the registered candidate."""
    return ApprovalOperator(
        task_id="approve_promotion",
        subject="Promote the new qa-lora model to champion?",
        body="The candidate passed the gate and is registered as `candidate`. "
        "Review runs/{{ run_id }}/eval/eval_report.md, then approve to make it the champion.",
        response_timeout=timedelta(days=3),
        notifiers=[ApprovalWaiting()],
    )


@task
def promote(run: dict) -> dict:
    return runner.promote_after_approval(run)


@task(trigger_rule="none_failed")  # after a refused or a promoted candidate alike; never after a failure
def retention(run: dict) -> dict:
    return runner.retain(run)


def gate_to_retention(run: dict) -> list:
    """gate -> export -> register -> [approval] -> promote -> retention, in order: what follows an evaluated
    candidate, the same in both DAGs (each `chain`s it after its own evaluation)."""
    return [
        gate(run),
        export(run),
        register(run),
        approval_required(run),
        approve(),
        promote(run),
        retention(run),
    ]


class ApprovalWaiting(BaseNotifier):
    """The approval task's notifier: tells orchestrate.notify that a candidate waits for a person."""

    def notify(self, context) -> None:
        runner.tell_approval_waiting(dict(context))
