"""DagBag integrity (Astronomer's pattern): the DAG imports cleanly, light, documented, wired as designed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "great_expectations", "mlflow", "peft", "trl", "dvc", "onnxruntime")


@pytest.fixture(scope="module")
def dagbag(repo_root: Path):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(repo_root / "dags"))


def test_no_import_errors(dagbag) -> None:
    assert dagbag.import_errors == {}


def test_hygiene(dagbag) -> None:
    dag = dagbag.dags["qa_lora_finetune"]
    assert {"qa-lora", "mlops"} <= set(dag.tags)
    assert dag.doc_md and "validate" in dag.doc_md
    assert dag.catchup is False and dag.max_active_runs == 1
    for t in dag.tasks:
        assert t.owner == "ml-platform", t.task_id
        assert t.execution_timeout is not None or t.task_id == "approve_promotion", t.task_id
    train = dag.get_task("train")
    assert train.retries >= 1 and train.retry_exponential_backoff


def test_stage_order(dagbag) -> None:
    dag = dagbag.dags["qa_lora_finetune"]

    def down(task_id: str) -> set[str]:
        return set(dag.get_task(task_id).downstream_task_ids)

    assert down("prepare") >= {"validate"}
    assert "version" in down("validate") and "train" in down("version")
    assert "evaluate" in down("train") and "gate" in down("evaluate")
    assert down("gate") == {"export"} and "register" in down("export")
    assert down("approval_required") == {"approve_promotion"}
    assert down("approve_promotion") == {"promote"}
    # retention runs last whether the candidate was refused, registered or promoted, never after a failure
    assert down("promote") == {"retention"} and dag.get_task("retention").trigger_rule == "none_failed"
    for short_circuit in ("gate", "approval_required"):  # they skip their direct downstream only
        assert dag.get_task(short_circuit).ignore_downstream_trigger_rules is False


def test_trigger_form_params(dagbag) -> None:
    from tasks.core.config import load_config

    params = dagbag.dags["qa_lora_finetune"].params
    cfg = load_config()
    assert params["learning_rate"] == cfg.train.learning_rate
    assert params["lora_target_modules"] == list(cfg.lora.target_modules)
    assert params["lora_modules_to_save"] == list(cfg.lora.modules_to_save) != []
    schema = params.get_param("learning_rate").schema
    assert schema["exclusiveMinimum"] == 0 and schema["section"] == "Training" and schema["title"]
    assert params["chat_template"] == "auto"
    assert params.get_param("chat_template").schema["enum"] == [
        "auto",
        "llama2",
        "llama3",
        "chatml",
        "mistral",
    ]
    for name in (
        "base_model",
        "data_source",
        "lora_r",
        "max_steps",
        "num_processes",
        "promote",
        "require_approval",
    ):
        assert name in params


def test_trigger_form_refuses_bad_values(dagbag) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    params = dagbag.dags["qa_lora_finetune"].params
    for name, bad in [
        ("learning_rate", -1.0),
        ("lora_r", 0),
        ("gate_on_fail", "maybe"),
        ("num_processes", 0),
    ]:
        param = params.get_param(name)
        with pytest.raises(ParamValidationError):
            param.resolve(bad)


def test_scheduled_and_data_aware(dagbag) -> None:
    dag = dagbag.dags["qa_lora_finetune"]
    text = repr(dag.timetable)
    assert "qa_lora_dataset" in text and "0 3 * * 1" in text


def test_parse_imports_nothing_heavy(repo_root: Path) -> None:
    code = (
        "import sys;"
        "import importlib.util as u;"
        f"s=u.spec_from_file_location('d', {str(repo_root / 'dags' / 'qa_lora_finetune.py')!r});"
        "m=u.module_from_spec(s); s.loader.exec_module(m);"
        "print(','.join(sorted(k for k in sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = proc.stdout.strip().splitlines()[-1]
    loaded = set(modules.split(","))
    assert not [m for m in HEAVY if m in loaded]


def test_producer_updates_the_asset_the_pipeline_watches(dagbag) -> None:
    producer = dagbag.dags["qa_dataset_refresh"]
    outlets = producer.get_task("refresh_dataset").outlets
    assert [a.name for a in outlets] == ["qa_lora_dataset"]
    assert "qa_lora_dataset" in repr(dagbag.dags["qa_lora_finetune"].timetable)


@pytest.mark.parametrize("hours_after_slot", [1, 15, 100])
def test_unpausing_never_runs_a_past_slot(dagbag, monkeypatch: pytest.MonkeyPatch, hours_after_slot) -> None:
    """What the scheduler computes for a never-run DAG (first unpause): the next slot, not the last one.

    Hour 1 and 15 lie inside the window where `run_immediately=False` (or a start_date) would still run
    the past Monday 03:00 slot; the service test checks the same against a real scheduler.
    """
    import pendulum
    from airflow.serialization.serialized_objects import DagSerialization

    dag = DagSerialization.from_dict(DagSerialization.to_dict(dagbag.dags["qa_lora_finetune"]))
    slot = pendulum.datetime(2026, 11, 30, 3, 0, tz="UTC")  # a Monday 03:00
    now = slot.add(hours=hours_after_slot)
    monkeypatch.setattr("airflow.timetables.trigger.utcnow", lambda: now)
    info = dag.next_dagrun_info(last_automated_run_info=None)
    assert info is not None and info.run_after > now, info
    assert dag.start_date is None and dag.catchup is False


def test_sweep_dag_maps_training_and_evaluation_and_takes_one_winner_on(dagbag) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    dag = dagbag.dags["qa_lora_sweep"]
    assert dag.schedule is None and dag.max_active_runs == 1  # manual only
    train, evaluate = dag.get_task("train"), dag.get_task("evaluate")
    assert train.is_mapped and evaluate.is_mapped and not dag.get_task("gate").is_mapped
    assert train.pool == dagbag.dags["qa_lora_finetune"].get_task("train").pool  # one training per slot
    assert dag.get_task("candidates").downstream_task_ids == {"train"}
    assert "pick_winner" in evaluate.downstream_task_ids
    assert dag.get_task("pick_winner").downstream_task_ids == {"gate"}
    assert dag.get_task("gate").downstream_task_ids == {"export"}
    # the form offers require_approval, and the DAG keeps the promise: the same approval step as the other
    finetune = dagbag.dags["qa_lora_finetune"]
    for task_id in ("approval_required", "approve_promotion", "promote", "retention"):
        assert dag.get_task(task_id).downstream_task_ids == finetune.get_task(task_id).downstream_task_ids
    assert "require_approval" in dag.params
    sweep = dag.params.get_param("sweep")
    assert len(sweep.resolve([{"lora.r": 4}, {"lora.r": 8}])) == 2
    with pytest.raises(ParamValidationError):
        sweep.resolve([])
