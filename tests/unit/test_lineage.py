"""OpenLineage events of a stage, read back as a catalog would: from the file transport's JSON lines and
from a loopback HTTP endpoint standing in for Marquez. The whole chain from a real DAG run is checked in
tests/e2e/test_airflow_e2e.py; every stage of `dvc repro` in tests/e2e/test_dvc_e2e.py."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from tasks.core.config import load_config
from tasks.runners.lineage import pipeline_run_id, stage_events

SECRET = "lineageSecret-1618"


def _run_dir(root: Path) -> Path:
    run = root / "runs" / "r1"
    (run / "eval").mkdir(parents=True)
    (run / "train" / "adapter").mkdir(parents=True)
    (run / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    version = {
        "dataset_hash": "0123456789abcdef0123456789abcdef.dir",
        "remote": f"s3://key:{SECRET}@bucket/dvc",
    }
    (run / "version.json").write_text(json.dumps(version))
    gate = {"passed": True, "decision": "pass", "reasons": [], "champion_version": "2",
            "rules": [{"name": "beats_base:token_f1", "passed": True, "value": 0.1, "threshold": 0.0}],
            "metrics": {"candidate": {"token_f1": 0.31}}}  # fmt: skip
    (run / "eval" / "gate.json").write_text(json.dumps(gate))
    (run / "reports").mkdir()
    counts = {"rows_in": 2600, "rows_out": 2594, "dropped": 6, "dropped_by_check": {"duplicate": 6}}
    (run / "reports" / "data_quality.json").write_text(
        json.dumps({"source": "/data/qa.jsonl", "counts": counts})
    )
    return run


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_stage_is_a_start_and_a_complete_with_versioned_datasets(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    cfg = load_config(overrides=[("register.tracking_uri", f"https://ci:{SECRET}@mlflow.example.com")])
    with stage_events(cfg, "register", run) as event:
        event["result"] = {"version": "3", "aliases": ["candidate", "champion"], "promotion": "promoted"}
    journal = tmp_path / "runs" / "lineage.jsonl"
    assert SECRET not in journal.read_text()
    start, done = _events(journal)
    assert (start["eventType"], done["eventType"]) == ("START", "COMPLETE")
    assert start["run"]["runId"] == done["run"]["runId"] and done["job"] == {
        "namespace": "qa-lora",
        "name": "register",
        "facets": {},
    }
    parent = done["run"]["facets"]["parent"]
    assert parent["run"]["runId"] == pipeline_run_id(run) and parent["job"]["name"] == "pipeline"
    dvc = next(d for d in done["inputs"] if d["name"] == "qa-dataset")
    assert dvc["facets"]["version"]["datasetVersion"] == "0123456789abcdef0123456789abcdef.dir"
    assert dvc["namespace"] == "dvc+s3://***@bucket/dvc"
    rows = dvc["facets"]["qa_lora_rows"]  # the Q&A file behind the version, with its row counts
    assert (rows["source"], rows["rowsIn"], rows["rowsOut"]) == ("/data/qa.jsonl", 2600, 2594)
    assert rows["droppedByCheck"] == {"duplicate": 6}
    (model,) = done["outputs"]
    assert model["namespace"] == "mlflow+https://***@mlflow.example.com" and model["name"] == "qa-lora"
    assert model["facets"]["version"]["datasetVersion"] == "3"
    gate = model["facets"]["qa_lora_gate"]
    assert gate["passed"] is True and gate["championVersion"] == "2" and gate["metrics"] == {"token_f1": 0.31}
    assert model["facets"]["qa_lora_registry"]["uri"] == "models:/qa-lora/3"


def test_a_failing_stage_is_a_fail_with_its_error_and_still_raises(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    cfg = load_config()
    with pytest.raises(RuntimeError), stage_events(cfg, "train", run):
        raise RuntimeError(f"cannot reach https://u:{SECRET}@hub.example.com")
    start, failed = _events(tmp_path / "runs" / "lineage.jsonl")
    assert failed["eventType"] == "FAIL" and failed["run"]["runId"] == start["run"]["runId"]
    message = failed["run"]["facets"]["errorMessage"]["message"]
    assert message.startswith("RuntimeError: cannot reach") and SECRET not in message


def test_http_transport_posts_to_a_lineage_server_with_its_api_key(tmp_path: Path, monkeypatch) -> None:
    received: list[tuple[str, str, dict]] = []

    class Marquez(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.path, self.headers.get("Authorization", ""), body))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Marquez)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENLINEAGE_API_KEY", "api-key-271")
    url = f"http://127.0.0.1:{server.server_port}"
    cfg = load_config(overrides=[("lineage.transport", "http"), ("lineage.url", url)])
    try:
        with stage_events(cfg, "version", _run_dir(tmp_path)) as event:
            event["result"] = {}
    finally:
        server.shutdown()
    assert [(path, auth, body["eventType"]) for path, auth, body in received] == [
        ("/api/v1/lineage", "Bearer api-key-271", "START"),
        ("/api/v1/lineage", "Bearer api-key-271", "COMPLETE"),
    ]
    assert not (tmp_path / "runs" / "lineage.jsonl").exists()


def test_http_without_a_url_is_refused_in_the_config() -> None:
    from tasks.core.errors import UserError

    with pytest.raises(UserError, match=r"lineage\.url"):
        load_config(overrides=[("lineage.transport", "http")])
