"""`airflow dags test qa_lora_finetune` end to end on the tiny model: artifacts, registry, a failing gate.

The runs share one registry: the first (good) run creates the champion; the second is sabotaged
(a learning rate too small to learn anything) and must fail the gate on the base rule and on the
champion rule, skip merge/export/register and leave the champion where it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DAG_ID = "qa_lora_finetune"


def _airflow(env: dict[str, str], *args: str, timeout: int = 1500) -> subprocess.CompletedProcess[str]:
    airflow = str(Path(sys.executable).with_name("airflow"))
    return subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _trigger(
    env: dict[str, str], conf: dict | None = None, dag_id: str = DAG_ID
) -> tuple[str, dict[str, str], Path]:
    """Run the DAG once; return (run id, task states, run dir). A mapped task's state is its instances'
    states joined with "," (e.g. "success,success")."""
    before = {r["run_id"] for r in _runs(env, dag_id)}
    args = ["dags", "test", dag_id] + (["-c", json.dumps(conf)] if conf else [])
    proc = _airflow(env, *args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (new,) = [r for r in _runs(env, dag_id) if r["run_id"] not in before]
    states = _airflow(env, "tasks", "states-for-dag-run", dag_id, new["run_id"], "-o", "json")
    task_states: dict[str, str] = {}
    for t in sorted(_json_list(states.stdout), key=lambda t: int(t.get("map_index") or -1)):
        joined = f"{task_states[t['task_id']]},{t['state']}" if t["task_id"] in task_states else t["state"]
        task_states[t["task_id"]] = joined
    from tasks.runners.airflow import run_dir_for

    run_dir = Path(env["QA_LORA_RUNS_ROOT"]) / run_dir_for(new["run_id"]).name
    return new["run_id"], task_states, run_dir


def _runs(env: dict[str, str], dag_id: str = DAG_ID) -> list[dict]:
    proc = _airflow(env, "dags", "list-runs", dag_id, "-o", "json", timeout=120)
    return _json_list(proc.stdout) if proc.returncode == 0 else []


def _json_list(stdout: str) -> list[dict]:
    """The JSON table an airflow CLI command printed (log lines may come before it)."""
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    return json.loads(lines[-1]) if lines else []


def _champion(e2e_home: Path) -> tuple[str, dict[str, str]] | None:
    import mlflow

    uri = f"sqlite:///{e2e_home}/mlflow.db"  # both: an earlier test may have left the global registry URI
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        mv = client.get_model_version_by_alias("qa-lora", "champion")
    except mlflow.exceptions.MlflowException:
        return None
    return mv.version, mv.tags


@pytest.fixture(scope="module")
def good_run(airflow_env: dict[str, str]) -> tuple[str, dict[str, str], Path]:
    return _trigger(airflow_env)


def test_good_run_succeeds_every_task(good_run) -> None:
    _, states, _ = good_run
    for task in ("prepare", "validate", "version", "train", "evaluate", "gate", "export", "register"):
        assert states[task] == "success", (task, states)
    # no approval asked for: the approval branch is skipped, visibly
    assert states["approval_required"] == "success"
    assert states["approve_promotion"] == "skipped" and states["promote"] == "skipped"
    assert states["retention"] == "success"  # the last task runs after a skipped approval


def test_good_run_artifacts(good_run) -> None:
    _, _, run = good_run
    for rel in (
        "params.effective.yaml",
        "data/train.jsonl",
        "data/eval.jsonl",
        "reports/data_quality.json",
        "version.json",
        "train/adapter/adapter_model.safetensors",
        "train/adapter/adapter_config.json",
        "train/train_summary.json",
        "eval/metrics.json",
        "eval/gate.json",
        "eval/eval_report.md",
        "eval/comparison.png",
        "export/merged/config.json",
        "export/export_summary.json",
        "export/README.md",
        "register/registration.json",
    ):
        assert (run / rel).is_file(), rel
    assert list((run / "reports" / "data_docs").rglob("*.html")), "GX Data Docs"
    assert list((run / "export" / "onnx").glob("*.onnx")), "ONNX graphs"
    assert json.loads((run / "eval" / "gate.json").read_text())["passed"] is True
    # Decisive, not a coin flip (#15): the small run's settings were chosen for a lower CI bound of at
    # least +0.02 over base in fp32 and bf16 (tests/e2e/small_run.py); a precision or base change that
    # shrinks the margin fails here before it turns the gate tests into chance.
    delta = json.loads((run / "eval" / "metrics.json").read_text())["candidate_minus_base"]["token_f1"]
    assert delta["ci_low"] >= 0.02, delta
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 120
    assert not list(run.rglob(".tmp-*")), "no temporary leftovers"


def test_good_run_registry_state(good_run, e2e_home: Path) -> None:
    run_id, _, run = good_run
    champion = _champion(e2e_home)
    assert champion is not None
    version, tags = champion
    registration = json.loads((run / "register" / "registration.json").read_text())
    assert str(registration["version"]) == str(version)
    dataset_hash = json.loads((run / "version.json").read_text())["dataset_hash"]
    assert dataset_hash in tags.values()
    assert any(run.name in v or run_id in v for v in tags.values())
    # the serving cost the export measured (no champion yet) is on the version, as measured
    serving = json.loads((run / "export" / "export_summary.json").read_text())["serving"]
    assert serving["champion"] is None and serving["passed"]
    for key in ("tokens_per_s_b1", "tokens_per_s_b8", "latency_p95_ms", "size_bytes", "peak_rss_bytes"):
        assert float(tags[f"qa_lora.serving.{key}"]) == pytest.approx(serving["candidate"][key], rel=1e-5)


def test_lineage_chains_the_run_to_its_dataset_version_and_model_version(good_run, e2e_home: Path) -> None:
    """What a catalog reads: the OpenLineage provider's DAG run, our stage runs under it, the DVC dataset
    version the version stage wrote and train read, and the model version register wrote from it."""
    _, _, run = good_run
    events = [json.loads(line) for line in (e2e_home / "runs" / "lineage.jsonl").read_text().splitlines()]
    ours = [e for e in events if e["job"]["namespace"] == "qa-lora" and e["job"]["name"] in STAGE_JOBS]
    done = {e["job"]["name"]: e for e in ours if e["eventType"] == "COMPLETE"}
    assert set(done) >= set(STAGE_JOBS), sorted(done)
    roots = {e["run"]["facets"]["parent"]["root"]["run"]["runId"] for e in done.values()}
    assert len(roots) == 1, roots  # one DAG run holds every stage run
    dag_runs = [e for e in events if e["job"]["name"] == "qa_lora_finetune" and e["run"]["runId"] in roots]
    assert dag_runs, "the provider's DAG run event"
    parents = {e["run"]["facets"]["parent"]["job"]["name"] for e in done.values()}
    assert parents >= {f"qa_lora_finetune.{stage}" for stage in STAGE_JOBS}

    def dvc(dataset_list: list) -> str:
        (d,) = [d for d in dataset_list if d["name"] == "qa-dataset"]
        return d["facets"]["version"]["datasetVersion"]

    dataset_hash = json.loads((run / "version.json").read_text())["dataset_hash"]
    assert dvc(done["version"]["outputs"]) == dvc(done["train"]["inputs"]) == dataset_hash
    (version,) = done["version"]["outputs"]  # the Q&A file behind it, with its row counts
    quality = json.loads((run / "reports" / "data_quality.json").read_text())["counts"]
    assert version["facets"]["qa_lora_rows"]["rowsOut"] == quality["rows_out"] > 0
    assert dvc(done["register"]["inputs"]) == dataset_hash
    (model,) = done["register"]["outputs"]
    registration = json.loads((run / "register" / "registration.json").read_text())
    assert model["facets"]["version"]["datasetVersion"] == str(registration["version"])
    assert (
        model["facets"]["qa_lora_gate"]["passed"] is True
        and "champion" in model["facets"]["qa_lora_registry"]["aliases"]
    )
    adapter = done["train"]["outputs"][0]
    assert adapter in [{**d, "inputFacets": {}} for d in done["export"]["inputs"]] or any(
        d["name"] == adapter["name"] for d in done["export"]["inputs"]
    )


STAGE_JOBS = ("validate", "version", "train", "evaluate", "export", "register")


def test_sabotaged_run_fails_the_gate_and_changes_nothing(good_run, airflow_env, e2e_home: Path) -> None:
    """The sabotaged candidate (it learns nothing: it is the base) fails both comparisons by name: the
    base rule, and the champion rule against the version the good run registered, fetched from the
    registry and scored (the form's `gate_max_regression` 0: no drop allowed, so the verdict is decisive)."""
    before = _champion(e2e_home)
    assert before is not None
    conf = {"learning_rate": 1e-9, "max_steps": 5, "gate_max_regression": 0.0}
    _, states, run = _trigger(airflow_env, conf)
    assert states["gate"] == "success"  # the short-circuit task ran and said no
    for task in ("export", "register", "approval_required", "approve_promotion", "promote"):
        assert states[task] == "skipped", (task, states)
    assert states["retention"] == "success"  # a refused candidate's run still ends with retention
    gate = json.loads((run / "eval" / "gate.json").read_text())
    assert gate["passed"] is False and gate["reasons"]
    failed = {rule["name"] for rule in gate["rules"] if not rule["passed"]}
    assert {"beats_base:token_f1", "no_regression:token_f1"} <= failed, gate["rules"]
    assert str(gate["champion_version"]) == str(before[0])
    assert gate["metrics"]["champion"]["n_rows"] == gate["eval_rows"]
    assert not (run / "export").exists() and not (run / "register").exists()
    assert _champion(e2e_home) == before


def test_sweep_takes_the_best_candidate_to_the_registry(good_run, airflow_env, e2e_home: Path) -> None:
    """Two points, one sabotaged (it cannot learn): the other wins, passes the gate and is registered;
    the loser stays on disk with its reports, and the run's report lists both."""
    from tasks.core.config import load_config

    before = _champion(e2e_home)
    assert before is not None
    recipe = {"lora.r": load_config(Path(airflow_env["QA_LORA_PARAMS"])).lora.r}
    sweep = [{"train.learning_rate": 1e-9, "train.max_steps": 5}, recipe]
    _, states, run = _trigger(airflow_env, {"sweep": sweep}, dag_id="qa_lora_sweep")
    assert states["train"] == states["evaluate"] == "success,success", states
    for task in ("candidates", "pick_winner", "gate", "export", "register"):
        assert states[task] == "success", (task, states)
    summary = json.loads((run / "eval" / "sweep.json").read_text())
    scores = {c["candidate"]: c["score"] for c in summary["candidates"]}
    assert summary["winner"] == 1 and summary["point"] == recipe and scores[1] > scores[0], summary
    assert (run / "sweep" / "c0" / "eval" / "eval_report.md").is_file()  # the loser is kept
    assert "## Sweep" in (run / "eval" / "eval_report.md").read_text()
    registration = json.loads((run / "register" / "registration.json").read_text())
    champion = _champion(e2e_home)
    assert champion is not None and str(champion[0]) == str(registration["version"])
    # the winner's export was measured as served beside the good run's champion, on this machine
    serving = json.loads((run / "export" / "export_summary.json").read_text())["serving"]
    assert serving["champion"]["version"] == str(before[0]) and serving["passed"], serving["rules"]
