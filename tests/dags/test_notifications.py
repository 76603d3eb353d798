"""Notices reach people: a real SMTP server on loopback (aiosmtpd, with a login) receives what the DAG's
callbacks, the gate task and the approval step send through Airflow's SmtpNotifier, read from the
Airflow connection the deployment defines. The Airflow services run of the same notices (the champion's
included) is tests/e2e/test_airflow_services.py."""

from __future__ import annotations

import json
import types
from email.message import EmailMessage
from pathlib import Path

import pytest
import yaml
from mail_sink import LOGIN, PASSWORD, MailSink, body, free_port, readable

from tasks.core.config import load_config, save_config
from tasks.runners import airflow as ds

RUN_ID = "manual__2026-12-07T10:00:00+00:00"


@pytest.fixture
def mailbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The SMTP server, the Airflow connection to it, params that name it."""
    sink = MailSink().start()
    monkeypatch.setenv("AIRFLOW_CONN_QA_LORA_SMTP", sink.connection())
    params = tmp_path / "params.yaml"
    notify = {
        "email_to": ["oncall@example.com"],
        "email_from": "qa-lora@example.com",
        "smtp_conn_id": "qa_lora_smtp",
    }
    params.write_text(yaml.safe_dump({"orchestrate": {"notify": notify}}))
    monkeypatch.setattr(ds, "PARAMS_FILE", str(params))
    monkeypatch.setattr(ds, "RUNS_ROOT", tmp_path / "runs")
    try:
        yield sink.messages, sink.logins, tmp_path / "runs" / "notifications.jsonl"
    finally:
        sink.stop()


def _no_credential(message: EmailMessage) -> None:
    text = readable(message)
    assert PASSWORD not in text and LOGIN not in text


def test_a_failed_run_is_mailed_with_its_task_and_reason(mailbox) -> None:
    received, logins, journal = mailbox
    ds.run_dir_for(RUN_ID).mkdir(parents=True)
    ti = types.SimpleNamespace(task_id="train")
    reason = f"train: connection to https://{LOGIN}:{PASSWORD}@s3.example.com refused"
    ds.notify({"dag_run": types.SimpleNamespace(run_id=RUN_ID, state="failed"), "ti": ti, "reason": reason})
    (message,) = received
    assert logins == [(LOGIN.encode(), PASSWORD.encode())]  # the connection's login reached the server
    assert message["Subject"] == f"[qa-lora] run failed: {RUN_ID}"
    assert message["To"] == "oncall@example.com" and message["From"] == "qa-lora@example.com"
    text = body(message)
    assert f"run: {RUN_ID}" in text and "failed_task: train" in text and "s3.example.com refused" in text
    _no_credential(message)
    record = json.loads(journal.read_text().splitlines()[-1])
    assert record["event"] == "failed" and record["sent_to"] == ["email:oncall@example.com"]
    assert PASSWORD not in journal.read_text()


def test_a_refused_candidate_is_mailed_with_the_failing_rule_and_the_report(mailbox, tmp_path: Path) -> None:
    received, _, _ = mailbox
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    gate = {
        "passed": False,
        "rules": [{"name": "max_general_ppl_increase", "passed": False, "value": 8.1, "threshold": 0.25}],
        "reasons": ["general text perplexity +812% > 25% over the base"],
    }
    (run_dir / "eval" / "gate.json").write_text(json.dumps(gate))
    save_config(load_config(), run_dir / "params.effective.yaml")
    assert ds.check_gate({"run_dir": str(run_dir)}) is False
    (message,) = received
    assert message["Subject"] == "[qa-lora] candidate refused: run"  # no Airflow context: the run dir's name
    text = body(message)
    assert "gate FAILED: general text perplexity +812% &gt; 25% over the base" in text
    assert f"report: {run_dir / 'eval' / 'eval_report.md'}" in text
    _no_credential(message)


def test_a_refusal_that_fails_the_run_is_told_once(mailbox, tmp_path: Path, monkeypatch) -> None:
    """gate.on_fail: fail: the gate task tells of the refusal and fails the run; the DAG's failure
    callback that follows records the failure without a second mail."""
    received, _, journal = mailbox
    monkeypatch.setattr(ds, "_current_run_id", lambda run: RUN_ID)
    run_dir = ds.run_dir_for(RUN_ID)
    (run_dir / "eval").mkdir(parents=True)
    gate = {"passed": False, "rules": [], "reasons": ["max_harness_regression: qa_lora_mc fell 0.12"]}
    (run_dir / "eval" / "gate.json").write_text(json.dumps(gate))
    save_config(load_config(overrides=[("gate.on_fail", "fail")]), run_dir / "params.effective.yaml")
    with pytest.raises(Exception, match="gate FAILED"):
        ds.check_gate({"run_dir": str(run_dir)})
    ti = types.SimpleNamespace(task_id="gate")
    ds.notify({"dag_run": types.SimpleNamespace(run_id=RUN_ID, state="failed"), "ti": ti, "reason": "gate"})
    assert [m["Subject"] for m in received] == [f"[qa-lora] candidate refused: {RUN_ID}"]
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(r["event"], r["sent_to"]) for r in records] == [
        ("refused", ["email:oncall@example.com"]),
        ("failed", []),
    ]
    # the same run's failure of another task (retention after the refusal) is still mailed
    later = types.SimpleNamespace(task_id="retention")
    ds.notify({"dag_run": types.SimpleNamespace(run_id=RUN_ID, state="failed"), "ti": later, "reason": "x"})
    assert received[-1]["Subject"] == f"[qa-lora] run failed: {RUN_ID}" and len(received) == 2


def test_an_approval_waiting_is_mailed_with_the_version_and_the_report(mailbox) -> None:
    received, _, _ = mailbox
    register = ds.run_dir_for(RUN_ID) / "register"
    register.mkdir(parents=True)
    (register / "registration.json").write_text(json.dumps({"version": "7"}))
    ds.tell_approval_waiting({"run_id": RUN_ID})
    (message,) = received
    assert message["Subject"] == f"[qa-lora] approval waiting: {RUN_ID}"
    text = body(message)
    assert "version 7 is registered as candidate" in text and "task: approve_promotion" in text
    assert "eval_report.md" in text


def test_an_unreachable_server_is_logged_and_recorded_never_raised(mailbox, monkeypatch, caplog) -> None:
    received, _, journal = mailbox
    monkeypatch.setenv("AIRFLOW_CONN_QA_LORA_SMTP", MailSink().connection(port=free_port()))
    ds.notify({"dag_run": types.SimpleNamespace(run_id=RUN_ID, state="failed"), "reason": "boom"})
    assert received == []
    record = json.loads(journal.read_text().splitlines()[-1])
    assert record["sent_to"] == [] and record["not_sent_to"] == ["email:oncall@example.com"]
    assert "not sent to email:oncall@example.com" in caplog.text and PASSWORD not in caplog.text


def test_a_succeeded_run_is_recorded_but_mails_nobody(mailbox) -> None:
    received, _, journal = mailbox
    ds.notify({"dag_run": types.SimpleNamespace(run_id=RUN_ID, state="success")})
    assert received == []
    assert json.loads(journal.read_text().splitlines()[-1])["event"] == "succeeded"


def test_a_slack_webhook_gets_the_same_notice(mailbox, tmp_path: Path, monkeypatch) -> None:
    """Slack's incoming webhook (the Slack provider's notifier) served by a loopback HTTP server."""
    import http.server
    import threading

    posts: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(
                {"path": self.path, "body": json.loads(self.rfile.read(int(self.headers["Content-Length"])))}
            )
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = "T000/B000/slackSecret-3141"
    url = f"http://127.0.0.1:{server.server_port}/services/{token}"
    monkeypatch.setenv(
        "AIRFLOW_CONN_QA_LORA_SLACK", json.dumps({"conn_type": "slackwebhook", "password": url})
    )
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"orchestrate": {"notify": {"slack_webhook_conn_id": "qa_lora_slack"}}}))
    monkeypatch.setattr(ds, "PARAMS_FILE", str(params))
    try:
        ds.notify({"dag_run": types.SimpleNamespace(run_id=RUN_ID, state="failed"), "reason": "train: OOM"})
    finally:
        server.shutdown()
    (post,) = posts
    assert post["path"] == f"/services/{token}"  # the token stays in the connection's URL
    text = post["body"]["text"]
    assert f"run failed: {RUN_ID}" in text and "reason: train: OOM" in text and "slackSecret" not in text
