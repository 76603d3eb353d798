"""The decisions behind the DAG, as plain functions: form -> overrides, routing to the GPU node, the gate."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tasks.core.config import REPO_ROOT, load_config, save_config
from tasks.core.errors import UserError
from tasks.runners import airflow as ds


def test_form_values_become_overrides() -> None:
    overrides = ds.overrides_from_params({"learning_rate": 0.01, "lora_r": 4})
    assert overrides == [("train.learning_rate", 0.01), ("lora.r", 4)]
    cfg = load_config(overrides=overrides)
    assert (cfg.train.learning_rate, cfg.lora.r) == (0.01, 4)


def test_unknown_conf_key_is_refused_in_one_line() -> None:
    # Airflow passes any trigger-conf key through to the params; a typo must not be silently ignored.
    with pytest.raises(UserError) as err:
        ds.overrides_from_params({"learning_rate": 0.01, "lr": 0.1})
    message = str(err.value)
    assert "\n" not in message and "unknown key 'lr'" in message
    assert "known keys:" in message and "learning_rate" in message and "max_steps" in message


@pytest.fixture(autouse=True)
def runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's own runs root: the gate and notices write notifications.jsonl there, not in the repo."""
    monkeypatch.setattr(ds, "RUNS_ROOT", tmp_path / "runs")
    return tmp_path / "runs"


@pytest.mark.parametrize(
    ("params", "names"),
    [({"lr": 0.1}, "unknown key 'lr'"), ({"data_source": "../../etc/passwd"}, "etc/passwd")],
)
def test_user_error_in_prepare_fails_once_and_creates_nothing(runs_root: Path, params, names) -> None:
    from airflow.sdk.exceptions import AirflowFailException  # fails the task without retries

    with pytest.raises(AirflowFailException, match=r"^prepare: ") as err:
        ds.start_run(params, "manual__2026-11-29T10:00:00+00:00")
    assert names in str(err.value)
    assert not runs_root.exists() or not any(runs_root.iterdir())


def test_failure_notice_names_only_paths_that_exist(runs_root: Path) -> None:
    def notice(run_id: str) -> dict:
        ds.notify({"dag_run": types.SimpleNamespace(run_id=run_id, state="failed"), "reason": "x"})
        return json.loads((runs_root / "notifications.jsonl").read_text().splitlines()[-1])

    assert notice("manual__refused")["run_dir"] is None
    ds.run_dir_for("manual__prepared").mkdir(parents=True)
    run_dir = notice("manual__prepared")["run_dir"]
    assert run_dir is not None and Path(run_dir).is_dir()


PASSWORD, TOKEN = "pw-Secret-4711", "tok-Secret-0815"  # a deployment's params file and worker env


@pytest.fixture
def fresh_logging():
    """Python's own record factory for the test (an earlier test may have installed the redacting one)."""
    factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)
    yield
    logging.setLogRecordFactory(factory)


def test_task_logs_mask_credentials_of_params_file_and_env(
    runs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_logging
) -> None:
    from airflow.sdk.exceptions import AirflowFailException
    from airflow.sdk.log import mask_logs  # the processor every line of an Airflow task log goes through

    params = tmp_path / "deploy.yaml"
    params.write_text(
        f"extends: {REPO_ROOT / 'params.yaml'}\n"
        f"register:\n  tracking_uri: https://alice:{PASSWORD}@mlflow.example.com\n"
    )
    monkeypatch.setattr(ds, "PARAMS_FILE", str(params))
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    with pytest.raises(AirflowFailException):  # refused after the config was read, before any run dir
        ds.start_run({"data_source": "../../etc/passwd"}, "manual__2026-12-03T07:00:00+00:00")

    line = f"POST https://alice:{PASSWORD}@mlflow.example.com failed ({PASSWORD}); token {TOKEN}"
    airflow_line = mask_logs(None, "error", {"event": line})["event"]  # e.g. a failed task's traceback
    library = logging.getLogger("mlflow.tracking.rest")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    library.addHandler(handler)
    try:
        library.error(line)  # a library's own record, as any handler receives it
    finally:
        library.removeHandler(handler)
    for shown in (airflow_line, seen[0].getMessage()):
        assert PASSWORD not in shown and TOKEN not in shown and "alice" not in shown, shown
        assert "mlflow.example.com" in shown  # the rest of the line stays readable


def test_failure_notice_masks_credentials(runs_root: Path) -> None:
    error = RuntimeError(f"cannot reach https://alice:{PASSWORD}@mlflow.example.com")
    ds.notify({"dag_run": types.SimpleNamespace(run_id="manual__x", state="failed"), "exception": error})
    text = (runs_root / "notifications.jsonl").read_text()
    assert PASSWORD not in text and "mlflow.example.com" in text


def test_every_form_field_maps_to_a_real_key() -> None:
    cfg = load_config()
    for key in ds.PARAM_KEYS.values():
        section, name = key.split(".")
        assert name in type(getattr(cfg, section)).model_fields, key


def test_run_dir_is_path_safe() -> None:
    d = ds.run_dir_for("manual__2026-11-27T18:00:00+00:00")
    assert d.parent == ds.RUNS_ROOT and "/" not in d.name and ":" not in d.name and "+" not in d.name


def test_local_train_runs_in_place() -> None:
    kwargs = ds.train_task_kwargs(load_config())
    assert "queue" not in kwargs and "executor_config" not in kwargs
    assert kwargs["pool"] == ds.TRAIN_POOL  # one training at a time; `make airflow` creates the pool
    assert kwargs["retries"] == 2 and kwargs["retry_exponential_backoff"] == 2.0


def test_celery_train_goes_to_the_gpu_queue_and_pool() -> None:
    cfg = load_config(overrides=["orchestrate.train_target=celery", "orchestrate.train_pool=mi300x"])
    kwargs = ds.train_task_kwargs(cfg)
    assert kwargs["queue"] == "mi300x" and kwargs["pool"] == "mi300x"


def test_kubernetes_train_requests_amd_gpus() -> None:
    # The real client models (the [kubernetes] extra; CI installs it): they refuse unknown keywords
    # and bad values, which a stand-in accepting anything would not.
    if not os.environ.get("CI"):
        pytest.importorskip("kubernetes.client", reason="pip install -e '.[kubernetes]'")
    from kubernetes.client import ApiClient
    from kubernetes.client import models as k8s

    cfg = load_config(overrides=["orchestrate.train_target=kubernetes", "orchestrate.kubernetes.gpus=8"])
    pod = ds.train_task_kwargs(cfg)["executor_config"]["pod_override"]
    assert isinstance(pod, k8s.V1Pod)
    container = pod.spec.containers[0]
    assert container.name == "base"  # the KubernetesExecutor merges the override into its `base` container
    assert container.resources.limits == {"amd.com/gpu": "8"} == container.resources.requests
    assert pod.spec.node_selector == {"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM"}
    (toleration,) = pod.spec.tolerations
    assert (toleration.key, toleration.operator, toleration.effect) == ("amd.com/gpu", "Exists", "NoSchedule")
    manifest = ApiClient().sanitize_for_serialization(pod)  # what is sent to the API server
    assert manifest["metadata"]["namespace"] == "ml"
    assert manifest["spec"]["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "8"}


def test_kubernetes_without_the_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("kubernetes", "kubernetes.client"):  # as if not installed, even after the test above
        monkeypatch.setitem(sys.modules, name, None)
    cfg = load_config(overrides=["orchestrate.train_target=kubernetes"])
    with pytest.raises(UserError, match=r"pip install 'qa-lora\[kubernetes\]'"):
        ds.train_task_kwargs(cfg)


def test_schedules() -> None:
    cfg = load_config()
    asset = ds.dataset_asset(cfg)
    assert "AssetOrTimeSchedule" in type(ds.schedule_for(cfg, asset)).__name__
    cron_only = load_config(overrides=["orchestrate.trigger_on_dataset=false"])
    assert type(ds.schedule_for(cron_only, asset)).__name__ == "CronTriggerTimetable"
    data_only = load_config(overrides=["orchestrate.schedule=null"])
    assert ds.schedule_for(data_only, asset) == [asset]
    manual = load_config(overrides=["orchestrate.schedule=null", "orchestrate.trigger_on_dataset=false"])
    assert ds.schedule_for(manual, asset) is None


def _run_with_gate(tmp_path: Path, passed: bool, on_fail: str = "skip") -> dict:
    cfg = load_config(overrides=[f"gate.on_fail={on_fail}"])
    save_config(cfg, tmp_path / "params.effective.yaml")
    (tmp_path / "eval").mkdir()
    gate = {
        "passed": passed,
        "decision": "pass" if passed else "fail",
        "rules": [{"name": "beats_base", "passed": passed, "value": 0.1, "threshold": 0.0, "detail": ""}],
        "reasons": [] if passed else ["token_f1: CI lower bound -0.01 <= min_improvement 0.0"],
    }
    (tmp_path / "eval" / "gate.json").write_text(json.dumps(gate))
    return {"run_dir": str(tmp_path)}


def test_gate_pass_lets_export_run(tmp_path: Path) -> None:
    assert ds.check_gate(_run_with_gate(tmp_path, True)) is True


def test_gate_fail_skips_with_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="qa_lora.dag"):
        assert ds.check_gate(_run_with_gate(tmp_path, False)) is False
    assert "gate FAILED: token_f1: CI lower bound" in caplog.text and "champion is unchanged" in caplog.text


def test_gate_fail_can_fail_the_run(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="gate FAILED: token_f1"):
        ds.check_gate(_run_with_gate(tmp_path, False, on_fail="fail"))


def test_user_error_in_a_stage_fails_without_retry(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=r"params\.effective\.yaml: not found"):
        ds.execute_stage("train", {"run_dir": str(tmp_path)})


@pytest.mark.parametrize("on_fail", ["skip", "fail"])
def test_serving_rules_refusing_at_export_skip_or_fail_like_the_gate(
    tmp_path: Path, on_fail: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export's serving rules raise GateFailed (stages/export/serving_gate.py; the rules have their
    own tests): the export task is skipped (register after it too) or fails once, as gate.on_fail says."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from tasks.core.layout import GateFailed
    from tasks.runners import pipeline

    run = _run_with_gate(tmp_path, True, on_fail)

    def refused(name: str, cfg: Any, run_dir: Path, lineage_parent: Any = None) -> dict:
        raise GateFailed(
            "serving gate failed: max_size_regression: candidate 12.5 MiB vs champion v3 10.0 MiB"
        )

    monkeypatch.setattr(pipeline, "run_stage", refused)
    expected = AirflowSkipException if on_fail == "skip" else AirflowFailException
    with pytest.raises(
        expected, match=r"^export: serving gate failed: max_size_regression: candidate 12\.5 MiB"
    ):
        ds.execute_stage("export", run)


def test_approval_only_when_asked(tmp_path: Path) -> None:
    for require, expected in ((False, False), (True, True)):
        cfg = load_config(overrides=[f"register.require_approval={str(require).lower()}"])
        save_config(cfg, tmp_path / "params.effective.yaml")
        assert ds.approval_required({"run_dir": str(tmp_path)}) is expected
