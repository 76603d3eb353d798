"""The decisions behind the DAG, as plain functions: form -> overrides, routing to the GPU node, the gate."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from tasks.core.config import load_config, save_config
from tasks.core.errors import UserError
from tasks.runners import airflow as ds


def test_form_values_become_overrides() -> None:
    overrides = ds.overrides_from_params({"learning_rate": 0.01, "lora_r": 4, "not_a_param": 1})
    assert overrides == [("train.learning_rate", 0.01), ("lora.r", 4)]
    cfg = load_config(overrides=overrides)
    assert (cfg.train.learning_rate, cfg.lora.r) == (0.01, 4)


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
    assert kwargs["retries"] == 2 and kwargs["retry_exponential_backoff"] == 2.0


def test_celery_train_goes_to_the_gpu_queue_and_pool() -> None:
    cfg = load_config(overrides=["orchestrate.train_target=celery", "orchestrate.train_pool=mi300x"])
    kwargs = ds.train_task_kwargs(cfg)
    assert kwargs["queue"] == "mi300x" and kwargs["pool"] == "mi300x"


def _fake_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubernetes client is an optional extra: a recording stand-in for its model classes."""

    def model(name: str) -> type:
        def init(self, **kw):
            self.__dict__.update(kw)

        return type(name, (), {"__init__": init})

    models = types.SimpleNamespace(
        **{
            n: model(n)
            for n in (
                "V1Pod",
                "V1ObjectMeta",
                "V1PodSpec",
                "V1Toleration",
                "V1Container",
                "V1ResourceRequirements",
            )
        }
    )
    client = types.ModuleType("kubernetes.client")
    client.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kubernetes", types.ModuleType("kubernetes"))
    monkeypatch.setitem(sys.modules, "kubernetes.client", client)


def test_kubernetes_train_requests_amd_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kubernetes(monkeypatch)
    cfg = load_config(overrides=["orchestrate.train_target=kubernetes", "orchestrate.kubernetes.gpus=8"])
    pod = ds.train_task_kwargs(cfg)["executor_config"]["pod_override"]
    container = pod.spec.containers[0]
    assert container.resources.limits == {"amd.com/gpu": "8"} == container.resources.requests
    assert pod.spec.node_selector == {"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM"}
    assert pod.spec.tolerations[0].key == "amd.com/gpu"


def test_kubernetes_without_the_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)
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


def test_approval_only_when_asked(tmp_path: Path) -> None:
    for require, expected in ((False, False), (True, True)):
        cfg = load_config(overrides=[f"register.require_approval={str(require).lower()}"])
        save_config(cfg, tmp_path / "params.effective.yaml")
        assert ds.approval_required({"run_dir": str(tmp_path)}) is expected
