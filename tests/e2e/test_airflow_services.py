"""The real Airflow services (API server, scheduler, DAG processor, triggerer; LocalExecutor, SQLite), used
through the REST API v2 exactly as the UI does: log in, unpause, trigger with conf, watch, approve or
reject through the human-in-the-loop endpoint, refresh the dataset Asset; then stop everything by PID.

One module-scoped set of services serves the tests in file order (a run queue, as in real life: the DAG
admits one active run). The last test kills the worker (the scheduler's group) while a training runs:
the training must end by itself within 30 s, and after the stop nothing of the services remains.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from airflow_api import DAG_ID, PRODUCER_ID, Api, project_home, start_services, states
from mail_sink import LOGIN, PASSWORD, MailSink, readable

from scripts.services import processes_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WAITING = {"awaiting_input", "deferred"}  # a human-in-the-loop task parked for a person (3.3: awaiting_input)
STAGES = ("prepare", "validate", "version", "train", "evaluate", "gate", "export", "register")


@pytest.fixture(scope="module")
def mail():
    sink = MailSink().start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def af(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, tiny_base: Path, mail: MailSink):
    tmp = tmp_path_factory.mktemp("af-services")
    notify = {"email_to": ["oncall@example.com"], "smtp_conn_id": "qa_lora_smtp"}
    home = project_home(tmp, repo_root, {"schedule": "0 3 * * 1", "notify": notify})
    home["AIRFLOW_CONN_QA_LORA_SMTP"] = mail.connection()  # as a deployment defines it: not in params
    services, api = start_services(tmp, home, pools={"qa_lora_train": 1})
    try:
        services.wait_healthy()
        api.login()
        yield services, api, tmp
    finally:
        leftovers = services.stop()
        assert not processes_of(services.env["AIRFLOW_HOME"]), leftovers


def _mail_for(mail: MailSink, title: str, run_id: str, timeout: float = 60) -> str:
    """The one message about `title` ("run failed", ...) for this run, as a person reads it."""
    deadline = time.monotonic() + timeout  # a DAG callback runs in the DAG processor, a little later
    subject = f"[qa-lora] {title}: {run_id}"
    while time.monotonic() < deadline and not [m for m in mail.messages if m["Subject"] == subject]:
        time.sleep(1)
    (message,) = [m for m in mail.messages if m["Subject"] == subject]
    text = readable(message)
    assert PASSWORD not in text and LOGIN not in text
    return text


def _champion(tmp: Path) -> str | None:
    import mlflow

    uri = f"sqlite:///{tmp}/mlflow.db"  # both: an earlier test may have left the global registry URI
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        return str(client.get_model_version_by_alias("qa-lora", "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


def _run_dir(tmp: Path, run_id: str) -> Path:
    from tasks.runners.airflow import run_dir_for

    return tmp / "runs" / run_dir_for(run_id).name


def test_unpausing_starts_no_run(af) -> None:
    _, api, _ = af
    for dag_id in (DAG_ID, PRODUCER_ID):
        assert api.wait_for_dag(dag_id)["is_paused"] is True  # new DAGs start paused
        api.unpause(dag_id)
    dag = api.call("GET", f"/dags/{DAG_ID}")
    assert datetime.fromisoformat(dag["next_dagrun_run_after"]) > datetime.now(UTC), dag
    time.sleep(15)  # several scheduler loops: a run for the past cron slot would have been created by now
    assert api.runs(DAG_ID) == []


def test_unknown_conf_key_fails_prepare_once(af, mail: MailSink) -> None:
    _, api, tmp = af
    run_id = api.trigger(DAG_ID, {"max_steps": 5, "lr": 0.1})
    state, tis = api.wait_finished(DAG_ID, run_id, timeout=300)
    assert state == "failed"
    assert tis["prepare"]["state"] == "failed" and tis["prepare"]["try_number"] == 1, tis["prepare"]
    assert all(tis[t]["state"] == "upstream_failed" for t in STAGES[1:4]), states(tis)
    notices = tmp / "runs" / "notifications.jsonl"
    deadline = time.monotonic() + 60  # the DAG callback runs in the DAG processor, a little later
    while time.monotonic() < deadline and run_id not in (notices.read_text() if notices.exists() else ""):
        time.sleep(1)
    (notice,) = [n for n in map(json.loads, notices.read_text().splitlines()) if n["run_id"] == run_id]
    assert notice["state"] == "failed" and notice["run_dir"] is None  # no path that does not exist
    assert notice["sent_to"] == ["email:oncall@example.com"], notice
    assert "failed_task: prepare" in _mail_for(mail, "run failed", run_id)


def _until_approval(api: Api, run_id: str) -> dict:
    tis = api.wait(DAG_ID, run_id, lambda t: t["approve_promotion"]["state"] in WAITING, what="approval")
    assert tis["approve_promotion"]["state"] in WAITING, states(tis)
    # A person reads the report before pressing a button. Airflow 3.3.2 has a race when the answer comes
    # within ~1 s of the pause: the scheduler re-queues the task for the answer, then handles the late
    # "paused" event from the executor as a state changed externally, retries the task, and the new try
    # waits for an answer that was already given (seen in CI: the run waited 20 min). The window is the
    # scheduler's, not the task's: with the other test worker training on the other CPU, the scheduler
    # handled the pause event 5.5 s after the task paused (2026-12-03), so 5 s was not enough.
    time.sleep(15)
    return tis


def _answer(api: Api, run_id: str, option: str) -> None:
    api.respond(DAG_ID, run_id, "approve_promotion", option)
    tis = api.wait(DAG_ID, run_id, lambda t: t["approve_promotion"]["state"] not in WAITING, 180, "answer")
    ti = tis["approve_promotion"]
    assert ti["state"] not in WAITING and ti["try_number"] == 1, f"answer {option!r} not taken: {ti}"


def test_approved_run_promotes_the_candidate(af, mail: MailSink) -> None:
    _, api, tmp = af
    run_id = api.trigger(DAG_ID, {"max_steps": 120, "require_approval": True})
    tis = _until_approval(api, run_id)
    waiting = _mail_for(mail, "approval waiting", run_id)
    assert "registered as candidate" in waiting and "eval_report.md" in waiting
    for task in (*STAGES, "approval_required"):
        assert tis[task]["state"] == "success", (task, states(tis))
    assert tis["train"]["pool"] == "qa_lora_train"
    assert _champion(tmp) is None  # registered, waiting for a person
    _answer(api, run_id, "Approve")
    state, tis = api.wait_finished(DAG_ID, run_id)
    assert state == "success" and tis["promote"]["state"] == "success", states(tis)
    run = _run_dir(tmp, run_id)
    for rel in ("params.effective.yaml", "train/adapter/adapter_model.safetensors", "eval/gate.json"):
        assert (run / rel).is_file(), rel
    assert json.loads((run / "eval" / "gate.json").read_text())["passed"] is True
    registration = json.loads((run / "register" / "registration.json").read_text())
    assert _champion(tmp) == str(registration["version"])
    assert f"version {registration['version']} is the champion" in _mail_for(mail, "new champion", run_id)


def test_rejected_run_keeps_the_champion(af) -> None:
    _, api, tmp = af
    before = _champion(tmp)
    assert before is not None
    run_id = api.trigger(DAG_ID, {"max_steps": 120, "require_approval": True})
    _until_approval(api, run_id)
    _answer(api, run_id, "Reject")
    state, tis = api.wait_finished(DAG_ID, run_id)
    assert state == "success" and tis["promote"]["state"] == "skipped", states(tis)
    assert (_run_dir(tmp, run_id) / "register" / "registration.json").is_file()
    assert _champion(tmp) == before
    # the gate compared this candidate with the champion fetched from the real registry
    gate = json.loads((_run_dir(tmp, run_id) / "eval" / "gate.json").read_text())
    assert gate["champion_version"] == before, gate
    rule = next(r for r in gate["rules"] if r["name"] == "no_regression:token_f1")
    assert rule["passed"] and rule["value"] is not None and "over 80 rows" in rule["detail"], rule


def test_dataset_update_starts_training_and_a_dead_worker_leaves_none(af) -> None:
    services, api, _ = af
    producer = api.trigger(PRODUCER_ID)
    assert api.wait_finished(PRODUCER_ID, producer, timeout=300)[0] == "success"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        asset_runs := [r for r in api.runs(DAG_ID) if r["run_type"] == "asset_triggered"]
    ):
        time.sleep(2)
    assert asset_runs, "updating the qa_lora_dataset Asset started no training run"
    run_id = asset_runs[0]["dag_run_id"]
    tis = api.wait(
        DAG_ID, run_id, lambda t: t["train"]["state"] == "running" and t["train"]["pid"], what="train"
    )
    log = Path(services.env["AIRFLOW_HOME"], "logs", f"dag_id={DAG_ID}", f"run_id={run_id}", "task_id=train")
    _wait_for_text(log / "attempt=1.log", "step 20/120")  # inside the training loop
    train = psutil.Process(tis["train"]["pid"])
    tree = [train, *train.children(recursive=True)]
    # The worker dies (SIGKILL to the scheduler's group: the scheduler and its LocalExecutor workers, which
    # supervise the tasks). Nobody is left to stop the training: it must end itself.
    os.killpg(services.procs["scheduler"].pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(tree):
        time.sleep(0.5)
    assert _alive(tree) == [], "the training outlived its worker by 30 s"
    killed_after = services.stop(orphan_wait=30)
    assert killed_after == [], f"processes that outlived the services by 30 s: {killed_after}"
    assert processes_of(services.env["AIRFLOW_HOME"]) == []


def _alive(procs: list[psutil.Process]) -> list[int]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def _wait_for_text(path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not in {path} after {timeout} s")
