"""Several nodes on Kubernetes (#38 item 4): the indexed Job and headless Service the train task creates,
built with the kubernetes client's real models and checked field by field as the API server receives
them; and the task's control of the Job (status logged, summary returned, Job and pods deleted when the
task is killed), with the cluster faked: no API server can be started here.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest

from tasks.core.config import load_config
from tasks.runners import airflow as runner

if not os.environ.get("CI"):
    pytest.importorskip("kubernetes.client", reason="pip install -e '.[kubernetes]'")

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from tasks.runners.kubernetes import JobFailed, job_manifest, names, service_manifest, train_on_nodes

NODES = [
    "train.nnodes=4",
    "train.max_restarts=2",
    "orchestrate.train_target=kubernetes",
    "orchestrate.kubernetes.gpus=8",
]


def _sent(obj) -> dict:
    return ApiClient().sanitize_for_serialization(obj)  # exactly what goes to the API server


def test_the_job_runs_one_pod_per_node_on_the_shared_run_directory(tmp_path: Path) -> None:
    cfg = load_config(overrides=NODES)
    run_dir = tmp_path / "runs" / "manual__2026-12-07"
    job, service = names(run_dir)
    manifest = _sent(job_manifest(cfg, run_dir))
    assert manifest["metadata"] == {
        "name": job,
        "namespace": "ml",
        "labels": {"app": "qa-lora", "qa-lora/train-job": job},
    }
    spec = manifest["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimitPerIndex"] == 2 and spec["ttlSecondsAfterFinished"] == 86400
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"]["qa-lora/train-job"] == job
    assert pod["subdomain"] == service and pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM"}
    assert pod["tolerations"] == [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (container,) = pod["containers"]
    assert container["command"] == [
        "qa-lora", "train", "--run-dir", str(run_dir.resolve()),
        "--set", f"train.rdzv_endpoint={job}-0.{service}:29400",
    ]  # fmt: skip
    assert container["resources"] == {"limits": {"amd.com/gpu": "8"}, "requests": {"amd.com/gpu": "8"}}
    assert container["volumeMounts"] == [{"name": "runs", "mountPath": str(run_dir.resolve().parent)}]
    assert pod["volumes"] == [{"name": "runs", "persistentVolumeClaim": {"claimName": "qa-lora-runs"}}]
    assert {"name": "QA_LORA_RUNS_ROOT", "value": str(run_dir.resolve().parent)} in container["env"]
    assert len(f"{job}-3") <= 63 and job == job.lower()  # a pod's hostname is a DNS label


def test_the_headless_service_names_the_pods_for_the_rendezvous(tmp_path: Path) -> None:
    cfg = load_config(overrides=NODES)
    job, service = names(tmp_path / "run")
    manifest = _sent(service_manifest(cfg, tmp_path / "run"))
    assert manifest["metadata"]["name"] == service
    assert manifest["spec"] == {
        "clusterIP": "None",
        "selector": {"qa-lora/train-job": job},
        "publishNotReadyAddresses": True,
        "ports": [{"name": "rdzv", "port": 29400, "targetPort": 29400}],
    }


def test_several_nodes_make_the_train_task_a_controller_without_gpus() -> None:
    one = runner.train_task_kwargs(load_config(overrides=NODES[2:]))
    several = runner.train_task_kwargs(load_config(overrides=NODES))
    assert "executor_config" in one and "executor_config" not in several


class FakeCluster:
    """BatchV1Api and CoreV1Api as the task uses them; the Job's status follows `statuses`."""

    def __init__(self, statuses: list[dict]) -> None:
        self.statuses, self.calls, self.objects = statuses, [], {}

    def create_namespaced_service(self, ns, body):
        self.calls.append(("create", "service", body.metadata.name))
        self.objects[("service", body.metadata.name)] = body

    def create_namespaced_job(self, ns, body):
        self.calls.append(("create", "job", body.metadata.name))
        self.objects[("job", body.metadata.name)] = body

    def read_namespaced_job_status(self, name, ns):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(status, BaseException):
            raise status
        conditions = [types.SimpleNamespace(status="True", **c) for c in status.get("conditions", [])]
        return types.SimpleNamespace(status=types.SimpleNamespace(**{**status, "conditions": conditions}))

    def _delete(self, kind, name, **kwargs):
        self.calls.append(("delete", kind, name, kwargs.get("propagation_policy")))
        if self.objects.pop((kind, name), None) is None:
            raise ApiException(status=404)

    def delete_namespaced_service(self, name, ns, **kwargs):
        self._delete("service", name, **kwargs)

    def delete_namespaced_job(self, name, ns, **kwargs):
        self._delete("job", name, **kwargs)


def _run(tmp_path: Path, statuses: list) -> tuple[FakeCluster, Path]:
    run_dir = tmp_path / "run"
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "train" / "train_summary.json").write_text(json.dumps({"steps": 40, "world_size": 32}))
    return FakeCluster(statuses), run_dir


def test_a_finished_job_returns_the_summary_and_leaves_no_service(tmp_path: Path, caplog) -> None:
    cluster, run_dir = _run(tmp_path, [
        {"active": 4, "succeeded": 0, "failed": 0},
        {"active": 2, "succeeded": 2, "failed": 0},
        {"active": 0, "succeeded": 4, "failed": 0, "conditions": [{"type": "Complete"}]},
    ])  # fmt: skip
    cfg = load_config(overrides=NODES)
    with caplog.at_level("INFO", logger="qa_lora.kubernetes"):
        summary = train_on_nodes(cfg, run_dir, apis=(cluster, cluster), poll_s=0)
    assert summary == {"steps": 40, "world_size": 32}
    job, service = names(run_dir)
    assert ("job", job) in cluster.objects and ("service", service) not in cluster.objects
    assert "4 active, 0 succeeded" in caplog.text and "0 active, 4 succeeded" in caplog.text


def test_a_failed_job_fails_the_task_and_keeps_its_pods_for_the_logs(tmp_path: Path) -> None:
    cluster, run_dir = _run(tmp_path, [
        {"active": 0, "succeeded": 0, "failed": 3,
         "conditions": [{"type": "Failed", "reason": "BackoffLimitExceeded", "message": "index 1 failed 3 times"}]},
    ])  # fmt: skip
    with pytest.raises(JobFailed, match="BackoffLimitExceeded: index 1 failed 3 times"):
        train_on_nodes(load_config(overrides=NODES), run_dir, apis=(cluster, cluster), poll_s=0)
    job, service = names(run_dir)
    assert ("job", job) in cluster.objects and ("service", service) not in cluster.objects


def test_a_killed_task_deletes_the_job_with_its_pods(tmp_path: Path) -> None:
    class Killed(BaseException):  # what Airflow raises in a task it terminates
        pass

    cluster, run_dir = _run(tmp_path, [{"active": 4, "succeeded": 0, "failed": 0}, Killed()])
    with pytest.raises(Killed):
        train_on_nodes(load_config(overrides=NODES), run_dir, apis=(cluster, cluster), poll_s=0)
    job, _ = names(run_dir)
    assert cluster.objects == {}
    assert ("delete", "job", job, "Foreground") in cluster.calls  # Foreground: the pods go first
