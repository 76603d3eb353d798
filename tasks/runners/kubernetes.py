"""Training on Kubernetes: one GPU pod for one node, an indexed Job and a headless Service for several.

`orchestrate.train_target: kubernetes` with `train.nnodes: 1` sends the train task itself to a GPU pod
(the KubernetesExecutor's pod override, :func:`gpu_pod`). With `train.nnodes > 1` the train task is a
small controller instead: it creates a headless Service and an indexed Job of `nnodes` pods, each running
`qa-lora train` on the shared run directory (a PersistentVolumeClaim mounted at the runs root, the same
path as in the Airflow workers), meeting at node 0's c10d rendezvous `<job>-0.<service>:<port>`; it logs
every change of the Job's status, returns the train summary rank 0 wrote, and deletes the Job (its pods
with it) and the Service when the task ends early: killed, timed out or failed. No orphan pods.

Why an indexed Job through the cncf-kubernetes provider, not a Kubeflow TrainJob: the Job controller is
in every cluster (no operator to install and upgrade), Indexed completion gives each pod the stable
hostname the rendezvous needs, torchrun's elastic agent in every pod already does what a TrainJob's
torch runtime would add (rendezvous, restarts), and Airflow already reaches the cluster through the
provider's connection (`orchestrate.kubernetes.conn_id`; in-cluster config or a kubeconfig).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.core.errors import UserError

log = logging.getLogger("qa_lora.kubernetes")

LABEL = "qa-lora/train-job"


def models() -> Any:
    """The kubernetes client's models (the [kubernetes] extra)."""
    try:
        from kubernetes.client import models as k8s
    except ImportError:
        raise UserError(
            "orchestrate.train_target: kubernetes needs the kubernetes client: "
            "pip install 'qa-lora[kubernetes]' (apache-airflow-providers-cncf-kubernetes)"
        ) from None
    return k8s


def gpu_pod(cfg: Config) -> Any:
    """A pod override requesting AMD GPUs on an MI300X node (KubernetesExecutor, one node)."""
    k8s, k = models(), cfg.orchestrate.kubernetes
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(namespace=k.namespace, labels={"app": "qa-lora", "stage": "train"}),
        spec=k8s.V1PodSpec(
            node_selector=dict(k.node_selector),
            tolerations=[k8s.V1Toleration(**t) for t in k.tolerations],
            containers=[
                k8s.V1Container(
                    name="base",  # the KubernetesExecutor's worker container
                    image=k.image,
                    resources=_gpus(cfg),
                )
            ],
        ),
    )


def names(run_dir: Path) -> tuple[str, str]:
    """(Job, Service) names for a run: DNS-1123 labels, short enough for `<job>-<index>` hostnames."""
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    return f"qa-lora-train-{digest}", f"qa-lora-rdzv-{digest}"


def service_manifest(cfg: Config, run_dir: Path) -> Any:
    """The headless Service that gives the Job's pods their DNS names (node 0 hosts the rendezvous)."""
    k8s, k = models(), cfg.orchestrate.kubernetes
    job, service = names(run_dir)
    return k8s.V1Service(
        metadata=k8s.V1ObjectMeta(name=service, namespace=k.namespace, labels={"app": "qa-lora", LABEL: job}),
        spec=k8s.V1ServiceSpec(
            cluster_ip="None",
            selector={LABEL: job},
            publish_not_ready_addresses=True,  # the rendezvous starts before any pod is ready
            ports=[k8s.V1ServicePort(name="rdzv", port=k.rdzv_port, target_port=k.rdzv_port)],
        ),
    )


def job_manifest(cfg: Config, run_dir: Path) -> Any:
    """The indexed Job: `train.nnodes` pods, each `qa-lora train` on the shared run directory."""
    k8s, k, t = models(), cfg.orchestrate.kubernetes, cfg.train
    job, service = names(run_dir)
    run_dir = Path(run_dir).resolve()
    command = ["qa-lora", "train", "--run-dir", str(run_dir), "--set",
               f"train.rdzv_endpoint={job}-0.{service}:{k.rdzv_port}"]  # fmt: skip
    container = k8s.V1Container(
        name="train",
        image=k.image,
        command=command,
        resources=_gpus(cfg),
        ports=[k8s.V1ContainerPort(name="rdzv", container_port=k.rdzv_port)],
        env=[k8s.V1EnvVar(name="QA_LORA_RUNS_ROOT", value=str(run_dir.parent))],
        volume_mounts=[k8s.V1VolumeMount(name="runs", mount_path=str(run_dir.parent))],
    )
    pod = k8s.V1PodSpec(
        subdomain=service,  # <job>-<index>.<service>: the rendezvous host is node 0's
        restart_policy="Never",  # torchrun restarts the workers; the Job replaces a lost pod
        node_selector=dict(k.node_selector),
        tolerations=[k8s.V1Toleration(**tol) for tol in k.tolerations],
        containers=[container],
        volumes=[
            k8s.V1Volume(
                name="runs",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=k.runs_claim),
            )
        ],
    )
    labels = {"app": "qa-lora", LABEL: job}
    return k8s.V1Job(
        metadata=k8s.V1ObjectMeta(name=job, namespace=k.namespace, labels=labels),
        spec=k8s.V1JobSpec(
            completion_mode="Indexed",
            completions=t.nnodes,
            parallelism=t.nnodes,
            backoff_limit_per_index=t.max_restarts,  # a lost node's pod comes back this many times
            ttl_seconds_after_finished=24 * 3600,  # kept a day for its logs
            template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels), spec=pod),
        ),
    )


def _gpus(cfg: Config) -> Any:
    k = cfg.orchestrate.kubernetes
    gpus = {k.gpu_resource: str(k.gpus)}
    return models().V1ResourceRequirements(limits=gpus, requests=gpus)


class JobFailed(RuntimeError):
    """The Job failed (a pod out of restarts, or the training itself): its pods and logs are kept a day."""


def train_on_nodes(
    cfg: Config, run_dir: Path, *, apis: tuple[Any, Any] | None = None, poll_s: float = 10.0
) -> dict:
    """Run the train stage as an indexed Job of `train.nnodes` pods; return the summary rank 0 wrote.

    Args:
        cfg: the run's configuration (`train.nnodes`, `orchestrate.kubernetes`).
        run_dir: the run directory, on the shared volume at the same path here and in the pods.
        apis: (BatchV1Api, CoreV1Api); default: the provider's KubernetesHook on `kubernetes.conn_id`.
        poll_s: seconds between reads of the Job's status.

    Raises:
        JobFailed: the Job failed (Airflow retries the task: a new Job resumes from the checkpoints).
    """
    from tasks.core.artifacts import read_json
    from tasks.core.layout import RunLayout

    batch, core = apis or _apis(cfg)
    ns, (job, service) = cfg.orchestrate.kubernetes.namespace, names(run_dir)
    _delete(batch, core, ns, job, service)  # what an earlier try of this task left
    core.create_namespaced_service(ns, service_manifest(cfg, run_dir))
    batch.create_namespaced_job(ns, job_manifest(cfg, run_dir))
    log.info("kubernetes: job %s/%s: %d pods, rendezvous %s-0.%s", ns, job, cfg.train.nnodes, job, service)
    try:
        _wait(batch, ns, job, poll_s)
    except JobFailed:
        _delete(None, core, ns, job, service)  # the failed pods stay for their logs (ttl: a day)
        raise
    except BaseException:  # killed, timed out, interrupted: no pod may keep training
        log.warning("kubernetes: stopping job %s/%s and its pods", ns, job)
        _delete(batch, core, ns, job, service)
        raise
    _delete(None, core, ns, job, service)
    return read_json(RunLayout.of(run_dir).train_summary)


def _wait(batch: Any, ns: str, job: str, poll_s: float) -> None:
    """Poll the Job, log each change of its pod counts, return on Complete, raise JobFailed on Failed."""
    seen = None
    while True:
        status = batch.read_namespaced_job_status(job, ns).status
        counts = (status.active or 0, status.succeeded or 0, status.failed or 0)
        if counts != seen:
            log.info("kubernetes: job %s/%s: %d active, %d succeeded, %d failed", ns, job, *counts)
            seen = counts
        for cond in status.conditions or []:
            if cond.status == "True" and cond.type == "Complete":
                return
            if cond.status == "True" and cond.type == "Failed":
                raise JobFailed(f"kubernetes job {ns}/{job} failed: {cond.reason}: {cond.message}")
        time.sleep(poll_s)


def _delete(batch: Any, core: Any, ns: str, job: str, service: str) -> None:
    """Delete the Job (Foreground: its pods first) and the Service, whichever exist."""
    from kubernetes.client.exceptions import ApiException

    calls = [(core.delete_namespaced_service, service, {})]
    if batch is not None:
        calls.append((batch.delete_namespaced_job, job, {"propagation_policy": "Foreground"}))
    for delete, name, kwargs in calls:
        try:
            delete(name, ns, **kwargs)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _apis(cfg: Config) -> tuple[Any, Any]:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    hook = KubernetesHook(conn_id=cfg.orchestrate.kubernetes.conn_id)
    return hook.batch_v1_client, hook.core_v1_client
