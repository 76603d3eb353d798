"""Faults injected into real `qa-lora` processes: kill -9 in train, export and register; racing
registrations; an unavailable MLflow store or DVC remote. Nothing partial may become visible, nothing
may be registered half-way, and a re-run completes.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import S3_BUCKET, Home, registry_versions
from loopback_s3 import LoopbackS3, free_port

pytestmark = pytest.mark.slow

SAVE_STEPS = 5  # the journey's train.save_steps


def _source_dir(source: str) -> Path:
    assert source.startswith("file://"), source
    return Path(source[len("file://") :])


def _assert_complete_tree(root: Path) -> None:
    """A registered artifact tree holds every part a consumer loads (adapter, merged, ONNX + data)."""
    for rel in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "merged/config.json",
        "merged/model.safetensors",
        "onnx/onnx_layout.json",
        "README.md",
        "reports/eval/gate.json",
    ):
        assert (root / rel).is_file() and (root / rel).stat().st_size > 0, root / rel
    graphs = list((root / "onnx").glob("*.onnx"))
    assert graphs, root / "onnx"


# ----------------------------------------------------------------------------------------------- train


def test_kill_9_during_training_loses_at_most_one_checkpoint_interval(journey: dict[str, Any]) -> None:
    kill, resumed = journey["train_kill"], journey["train_resume"]
    assert kill["returncode"] == -signal.SIGKILL
    assert kill["complete_checkpoints"], "the kill came after a checkpoint"
    # no adapter or summary was ever visible before training finished
    assert not kill["adapter_seen_while_running"]
    assert not kill["adapter_after_kill"] and not kill["summary_after_kill"]
    reached = max(kill["steps_logged"])
    assert resumed["status"] == "resumed"
    assert resumed["resumed_from_step"] == max(kill["complete_checkpoints"])
    lost = reached - resumed["resumed_from_step"]
    assert 0 <= lost <= SAVE_STEPS, (reached, resumed["resumed_from_step"])
    assert f"resuming from {journey['run'] / 'train' / 'checkpoints'}" in journey["train_resume_log"]


def test_resumed_training_finishes_with_a_valid_adapter(journey: dict[str, Any]) -> None:
    from safetensors import safe_open

    run, resumed = journey["run"], journey["train_resume"]
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    assert summary["steps"] == summary["max_steps"] == 20
    assert summary["resumed_from_step"] == resumed["resumed_from_step"]
    # the second attempt trained only the steps after the checkpoint
    assert 0 < summary["tokens_seen_this_attempt"] < summary["tokens_seen"]
    logged = {h["step"] for h in summary["loss_history"]}
    assert logged == set(range(1, 21)), "the loss history covers every step once"
    adapter = run / "train" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fh:
        names = list(fh.keys())
        assert names and all(fh.get_tensor(n).isfinite().all() for n in names)
    assert not (run / "train" / ".staging-adapter").exists()


# ---------------------------------------------------------------------------------------------- export


def test_kill_9_during_export_leaves_nothing_for_later_stages(journey: dict[str, Any]) -> None:
    kill = journey["export_kill"]
    assert kill["returncode"] == -signal.SIGKILL
    assert kill["tmp_after_kill"], "the kill came while the temporary export was being written"
    assert not kill["export_seen_while_running"] and not kill["export_after_kill"]
    refused = journey["register_after_export_kill"]
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "missing or empty" in refused.stderr and "Traceback" not in refused.stderr
    assert journey["versions_after_export_kill"]["versions"] == []


def test_export_rerun_after_kill_completes(journey: dict[str, Any]) -> None:
    run = journey["run"]
    assert not journey["tmp_after_rerun"], "the leftover temporary export was cleared"
    assert journey["export_rerun"].get("reused") is False
    assert (run / "export" / "export_summary.json").is_file()
    assert list((run / "export" / "onnx").glob("*.onnx"))


# -------------------------------------------------------------------------------------------- register


def test_kill_9_during_upload_registers_nothing(journey: dict[str, Any]) -> None:
    upload = journey["register_kills"]["upload"]
    assert upload["returncode"] == -signal.SIGKILL, upload["stderr"]
    assert upload["versions"]["versions"] == [] and upload["versions"]["aliases"] == {}
    assert not upload["registration_json"]
    # the half-uploaded MLflow run is left unfinished, so a later attempt does not reuse it
    assert [r["status"] for r in upload["versions"]["runs"] if "qa_lora.run_id" in r["tags"]] == ["RUNNING"]


def test_kill_9_after_version_creation_leaves_no_alias_on_a_partial_tree(journey: dict[str, Any]) -> None:
    killed = journey["register_kills"]["version"]
    assert killed["returncode"] == -signal.SIGKILL, killed["stderr"]
    versions = killed["versions"]["versions"]
    assert len(versions) == 1 and killed["versions"]["aliases"] == {}
    # a version exists only for a finished upload: its tree is complete
    assert versions[0]["run_status"] == "FINISHED"
    _assert_complete_tree(_source_dir(versions[0]["source"]))
    assert not killed["registration_json"]


def test_register_rerun_completes_without_duplicates(journey: dict[str, Any]) -> None:
    final, record = journey["versions_final"], journey["register_rerun"]
    killed_version = journey["register_kills"]["version"]["versions"]["versions"][0]["version"]
    assert [v["version"] for v in final["versions"]] == [killed_version]  # the same version, once
    assert record["version"] == killed_version and record["created"] is False
    assert record["promoted"] is True and final["aliases"] == {"candidate": "1", "champion": "1"}
    for version in final["versions"]:
        _assert_complete_tree(_source_dir(version["source"]))
    assert (journey["run"] / "register" / "registration.json").is_file()


# ------------------------------------------------------------------------------------------ concurrency


def _race_copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("register", "checkpoints"))
    return dest


def test_two_registrations_racing_leave_one_champion_and_overwrite_nothing(journey: dict[str, Any]) -> None:
    """Two finished runs register and promote at the same moment against one fresh SQLite registry.

    Both gates compared against "no champion"; the first to take the registry lock promotes, the other
    finds the champion changed since its gate ran and stays a candidate.
    """
    home: Home = journey["home"]
    uri = f"sqlite:///{home.root / 'race' / 'mlflow.db'}"
    runs = [_race_copy(journey["run"], home.root / "race" / name) for name in ("run-a", "run-b")]
    procs = [home.start("register", r, f"register.tracking_uri={uri}")[0] for r in runs]
    codes = [p.wait(timeout=600) for p in procs]
    logs = sorted(home.logs.glob("*-register.log"))[-2:]
    assert codes == [0, 0], "\n".join(p.read_text()[-2000:] for p in logs)
    records = [json.loads((r / "register" / "registration.json").read_text()) for r in runs]
    state = registry_versions(home, uri)
    winners = [r for r in records if r["promoted"]]
    losers = [r for r in records if not r["promoted"]]
    assert len(winners) == 1 and len(losers) == 1, records
    assert state["aliases"]["champion"] == winners[0]["version"]
    assert winners[0]["gate_champion_version"] is None and winners[0]["champion_before"] is None
    assert (
        losers[0]["promotion"] == "refused" and "champion changed since the gate ran" in losers[0]["reason"]
    )
    # nothing overwritten: two versions, two distinct complete trees
    assert sorted(v["version"] for v in state["versions"]) == ["1", "2"]
    sources = {v["source"] for v in state["versions"]}
    assert len(sources) == 2
    for source in sources:
        _assert_complete_tree(_source_dir(source))


# ------------------------------------------------------------------------------------ unavailable stores


@pytest.mark.parametrize("kind", ["unwritable-sqlite", "closed-port"])
def test_unavailable_mlflow_store_fails_register_clearly(journey: dict[str, Any], kind: str) -> None:
    home: Home = journey["home"]
    blocker = home.root / "not-a-directory"
    blocker.write_text("a file where the registry directory should be")
    uri = (
        f"sqlite:///{blocker}/mlflow.db" if kind == "unwritable-sqlite" else f"http://127.0.0.1:{free_port()}"
    )
    run = _race_copy(journey["run"], home.root / f"unavailable-{kind}")
    done = home.run("register", run, f"register.tracking_uri={uri}")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("qa-lora: error:")]
    assert len(lines) == 1 and uri in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (run / "register").exists()


# kind -> (remote, extra environment, the one error line); {blocker} and {endpoint} filled in below
DVC_REMOTE_FAULTS = {
    "unwritable-dir": (
        "{blocker}/remote",
        {},
        "data.dvc_remote='{blocker}/remote': push to {blocker}/remote failed: [Errno 20] Not a directory: ",
    ),
    "s3-missing-bucket": (
        "s3://qa-lora-no-such-bucket/x",
        {},
        "data.dvc_remote='s3://qa-lora-no-such-bucket/x': push to s3://qa-lora-no-such-bucket/x failed: "
        "The specified bucket does not exist",
    ),
    "s3-wrong-secret": (
        f"s3://{S3_BUCKET}/x",
        {"AWS_SECRET_ACCESS_KEY": "not-the-secret-key-0123456789"},
        f"data.dvc_remote='s3://{S3_BUCKET}/x': push to s3://{S3_BUCKET}/x failed: The request signature we "
        "calculated does not match the signature you provided. Check your key and signing method.",
    ),
    "s3-unreachable": (
        f"s3://{S3_BUCKET}/x",
        {"AWS_ENDPOINT_URL": "{endpoint}", "AWS_MAX_ATTEMPTS": "1"},
        f"data.dvc_remote='s3://{S3_BUCKET}/x': push to s3://{S3_BUCKET}/x failed: "
        f'Could not connect to the endpoint URL: "{{endpoint}}/{S3_BUCKET}"',
    ),
}


@pytest.mark.parametrize("kind", list(DVC_REMOTE_FAULTS))
def test_unavailable_dvc_remote_fails_version_clearly(
    journey: dict[str, Any], s3_server: LoopbackS3, kind: str
) -> None:
    """`qa-lora version` against a real S3 server on loopback (and a local path): one line, exit 2."""
    home: Home = journey["home"]
    blocker = home.root / "not-a-directory"
    blocker.write_text("a file where the remote directory should be")
    fill = {"blocker": str(blocker), "endpoint": f"http://127.0.0.1:{free_port()}"}
    remote, env, expected = DVC_REMOTE_FAULTS[kind]
    remote, expected = remote.format(**fill), expected.format(**fill)
    env = {k: v.format(**fill) for k, v in env.items()}
    run = home.root / f"novremote-{kind}"
    shutil.copytree(journey["run"] / "data", run / "data")
    done = home.run("version", run, f"data.dvc_remote={remote}", env=s3_server.env(**env))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("qa-lora: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"qa-lora: error: {expected}"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (run / "version.json").exists()


def test_dag_retries_the_stages_that_talk_to_remote_stores() -> None:
    """A store that is briefly unavailable is retried by Airflow (version, register, train)."""
    from airflow.dag_processing.dagbag import DagBag

    from tasks.core.config import REPO_ROOT

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags" / "qa_lora_finetune.py"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["qa_lora_finetune"]
    for task_id in ("version", "register", "train"):
        task = dag.get_task(task_id)
        assert task.retries >= 1, task_id
        assert task.retry_exponential_backoff, task_id


def test_dag_retries_an_unavailable_store_but_not_a_user_error(tmp_path: Path) -> None:
    """execute_stage lets StoreUnavailable through (Airflow retries it) and fails bad input at once."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.core.config import load_config, save_config
    from tasks.core.errors import StoreUnavailable
    from tasks.runners import airflow as dag_support

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    run_dir = tmp_path / "run"
    save_config(
        load_config(overrides=[f"data.dvc_remote={blocker}/remote"]), run_dir / "params.effective.yaml"
    )
    (run_dir / "data").mkdir()
    for name in ("train", "eval"):
        (run_dir / "data" / f"{name}.jsonl").write_text('{"id": "1", "question": "q", "answer": "a"}\n')
    with pytest.raises(StoreUnavailable, match=str(blocker)):
        dag_support.execute_stage("version", {"run_dir": str(run_dir)})
    (run_dir / "data" / "eval.jsonl").unlink()
    with pytest.raises(AirflowFailException, match="no validated split"):
        dag_support.execute_stage("version", {"run_dir": str(run_dir)})
