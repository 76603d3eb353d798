"""
# qa_lora_sweep

A hyper-parameter sweep as one pipeline run: **validate** and **version** the dataset once, then
**train** and **evaluate** one candidate per sweep point (dynamic task mapping; the train pool keeps one
training at a time per slot), **pick** the best by the gate's primary metric, and take it on to the
**gate**, **export**, **register**, [approval] and **retention**, exactly as `qa_lora_finetune` does.

* Manual only: *Trigger DAG w/ config*; `sweep` is a list of `lora.*` / `train.*` overrides, e.g.
  `[{"lora.r": 8}, {"lora.r": 16, "train.learning_rate": 0.003}]`; the other fields are the run's.
* Every candidate is kept under `runs/<run id>/sweep/c<i>/` with its reports and MLflow training run;
  the run's `eval/eval_report.md` lists them all, and `eval/sweep.json` names the winner.
* Promotion follows `register.promote`; with *Require human approval*, the winner waits at
  `approve_promotion` like any candidate of `qa_lora_finetune`.

This file only wires: the code is `tasks/runners/sweep.py` and the stages in `tasks/`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import chain, dag, get_current_context, task

from tasks.runners import airflow as runner
from tasks.runners.airflow_tasks import TRAIN_ROUTING, gate_to_retention, validate, version

CFG = runner.default_config()


@dag(
    dag_id="qa_lora_sweep",
    description="LoRA sweep: train and evaluate one candidate per point, take the best to the registry",
    doc_md=__doc__,
    schedule=None,
    catchup=False,
    max_active_runs=1,
    params=runner.sweep_params(CFG),
    tags=["qa-lora", "llm", "lora", "sweep"],
    default_args={
        "owner": "ml-platform",
        "retries": 1,
        "retry_delay": timedelta(minutes=1),
        "execution_timeout": timedelta(minutes=CFG.orchestrate.stage_timeout_minutes),
    },
    on_success_callback=runner.notify,
    on_failure_callback=runner.notify,
)
def qa_lora_sweep() -> None:
    @task
    def prepare() -> dict:  # the run, and its sweep points checked
        ctx = get_current_context()
        return runner.start_sweep(dict(ctx["params"]), ctx["run_id"])

    @task
    def candidates(run: dict) -> list[dict]:  # one candidate run directory per point
        return runner.sweep_candidates(run)

    @task(**TRAIN_ROUTING)
    def train(candidate: dict) -> dict:
        runner.execute_stage("train", candidate)
        return candidate

    @task
    def evaluate(candidate: dict) -> dict:
        runner.execute_stage("evaluate", candidate)
        return candidate

    @task
    def pick_winner(run: dict, evaluated: list[dict]) -> dict:  # copied into the run: the rest is as usual
        return runner.pick_sweep_winner(run, list(evaluated))

    run = prepare()
    points = candidates(run)
    chain(validate(run), version(run), points)
    winner = pick_winner(run, evaluate.expand(candidate=train.expand(candidate=points)))
    chain(winner, *gate_to_retention(run))


qa_lora_sweep()
