"""
# qa_dataset_refresh

The producer side of data-aware retraining: rebuilds the bundled Q&A dataset from its source
(`data/build_qa_dataset.py`) and marks the `qa_lora_dataset` Asset as updated, which triggers
`qa_lora_finetune`. Replace the task body with your own ingestion; keep `outlets=[DATASET]`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from tasks.runners.airflow import dataset_asset, default_config, refresh_dataset

CFG = default_config()
DATASET = dataset_asset(CFG)


@dag(
    dag_id="qa_dataset_refresh",
    description="Refresh the Q&A dataset; updating the Asset triggers qa_lora_finetune",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["qa-lora", "data"],
    default_args={"owner": "ml-platform", "retries": 1, "execution_timeout": timedelta(minutes=10)},
)
def qa_dataset_refresh() -> None:
    @task(outlets=[DATASET], task_id="refresh_dataset")
    def refresh() -> dict:
        return refresh_dataset(CFG)

    refresh()


qa_dataset_refresh()
