"""The params sections that say how the pipeline is operated, not what it computes: `orchestrate` (with
its `kubernetes` and `notify` parts) and `lineage`; and `Section`, every params section's base.

tasks/core/config.py assembles them with the stage sections into the one `Config`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A params section: frozen, unknown keys refused, defaults validated like given values."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# The train task's pod, or pods for train.nnodes > 1 (the [kubernetes] extra; tasks/runners/kubernetes.py).
class KubernetesConfig(Section):
    namespace: str = "ml"
    image: str = "rocm/pytorch:latest"
    gpu_resource: str = "amd.com/gpu"  # the AMD device plugin's resource name
    gpus: int = Field(1, ge=1, le=16)
    node_selector: dict[str, str] = {"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM"}
    tolerations: tuple[dict[str, str], ...] = (
        {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    )
    conn_id: str = "kubernetes_default"  # train.nnodes > 1: the Airflow connection to the cluster
    runs_claim: str = "qa-lora-runs"  # the PVC mounted at the runs root in every pod (shared run dirs)
    rdzv_port: int = Field(29400, ge=1, le=65535)


NOTIFY_EVENTS = ("failed", "refused", "champion", "approval")


class NotifyConfig(Section):  # who hears of a run besides the log and notifications.jsonl (notifiers)
    events: tuple[Literal[NOTIFY_EVENTS], ...] = NOTIFY_EVENTS  # type: ignore[valid-type]
    email_to: tuple[str, ...] = ()  # empty: no email
    email_from: str = "qa-lora@localhost"
    smtp_conn_id: str = "smtp_default"  # the Airflow connection holds the server and its credentials
    slack_webhook_conn_id: str | None = None  # needs the [slack] extra


class OrchestrateConfig(Section):
    """How Airflow runs the pipeline: schedule, where the train task goes, retries, timeouts."""

    schedule: str | None = "0 3 * * 1"  # cron; null: only manual and data-triggered runs
    trigger_on_dataset: bool = True  # also run when a producer updates the Q&A dataset Asset
    train_target: Literal["local", "celery", "kubernetes"] = "local"
    train_queue: str = "mi300x"  # Celery queue served by `airflow celery worker -q mi300x` on the GPU node
    train_pool: str | None = None  # e.g. "mi300x" with one slot per GPU node; must exist (airflow pools set)
    train_retries: int = Field(2, ge=0, le=10)
    retry_delay_minutes: float = Field(1.0, gt=0.0)
    train_timeout_minutes: float = Field(360.0, gt=0.0)
    stage_timeout_minutes: float = Field(60.0, gt=0.0)
    kubernetes: KubernetesConfig = KubernetesConfig()
    notify: NotifyConfig = NotifyConfig()


class LineageConfig(Section):  # OpenLineage events from every stage (tasks/runners/lineage.py)
    namespace: str = "qa-lora"
    transport: Literal["file", "console", "http", "openlineage", "none"] = "file"
    url: str | None = None  # transport http: Marquez or DataHub (an API key from OPENLINEAGE_API_KEY)

    @model_validator(mode="after")
    def _url_for_http(self) -> LineageConfig:
        if self.transport == "http" and not self.url:
            raise ValueError("lineage.transport http needs lineage.url (e.g. http://marquez:5000)")
        return self
