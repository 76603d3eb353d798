"""What the Airflow DAG needs beyond wiring: trigger-form Params, run set-up, gate decision, routing.

Kept out of dags/ so the DAG file only wires, and light: this module imports only the standard library,
yaml and pydantic at top level (the DAG processor parses the DAG file often). Airflow itself is
imported inside functions, so the module is usable (and tested) as plain Python.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from tasks.core.config import REPO_ROOT, Config, load_config
from tasks.core.errors import StoreUnavailable, UserError

log = logging.getLogger("qa_lora.dag")

DAG_ID = "qa_lora_finetune"
# A deployment (or a test) can point the DAG at another params file and runs root without editing it.
PARAMS_FILE = os.environ.get("QA_LORA_PARAMS") or None
RUNS_ROOT = Path(os.environ.get("QA_LORA_RUNS_ROOT") or REPO_ROOT / "runs")

# Trigger-form field -> config key. The form's defaults come from params.yaml; values a user changes
# become overrides for that run only, and the effective config is saved in the run directory.
PARAM_KEYS: dict[str, str] = {
    "base_model": "base.name_or_path",
    "base_kind": "base.kind",
    "data_source": "data.source",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "num_train_epochs": "train.num_train_epochs",
    "max_steps": "train.max_steps",
    "learning_rate": "train.learning_rate",
    "num_processes": "train.num_processes",
    "gate_min_improvement": "gate.min_improvement",
    "gate_max_regression": "gate.max_regression",
    "gate_on_fail": "gate.on_fail",
    "promote": "register.promote",
    "require_approval": "register.require_approval",
}


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return list(node) if isinstance(node, tuple) else node


def trigger_params(cfg: Config) -> dict[str, Any]:
    """The DAG's Params: the trigger form, with titles, sections, enums and bounds that refuse bad values.

    Args:
        cfg: the defaults (params.yaml).

    Returns:
        name -> airflow.sdk.Param.
    """
    from airflow.sdk import Param

    d = {name: _get(cfg, key) for name, key in PARAM_KEYS.items()}
    model, lora, train, gate, reg = "Model and data", "LoRA", "Training", "Regression gate", "Registry"
    return {
        "base_model": Param(
            d["base_model"],
            type="string",
            minLength=1,
            title="Base model",
            description="Local directory or hub id, e.g. meta-llama/Llama-2-7b-chat-hf (set base kind: hub).",
            section=model,
        ),
        "base_kind": Param(
            d["base_kind"],
            enum=["tiny", "hub"],
            title="Base kind",
            description="tiny: the embedded CPU model (built if missing); hub: load as is.",
            section=model,
        ),
        "data_source": Param(
            d["data_source"],
            type="string",
            minLength=1,
            title="Q&A dataset",
            description="JSONL, CSV or Parquet file inside the allowed data roots.",
            section=model,
        ),
        "lora_r": Param(d["lora_r"], type="integer", minimum=1, maximum=1024, title="Rank r", section=lora),
        "lora_alpha": Param(
            d["lora_alpha"],
            type="integer",
            minimum=1,
            title="Alpha",
            description="scale = alpha / r",
            section=lora,
        ),
        "lora_dropout": Param(
            d["lora_dropout"], type="number", minimum=0, maximum=0.99, title="Dropout", section=lora
        ),
        "lora_target_modules": Param(
            d["lora_target_modules"],
            type="array",
            items={"type": "string"},
            minItems=1,
            title="Target modules",
            description="One module name per line, e.g. q_proj, v_proj.",
            section=lora,
        ),
        "num_train_epochs": Param(
            d["num_train_epochs"],
            type="number",
            exclusiveMinimum=0,
            maximum=100,
            title="Epochs",
            section=train,
        ),
        "max_steps": Param(
            d["max_steps"],
            type="integer",
            minimum=-1,
            title="Max steps",
            description="-1: train the epochs above; > 0: stop after this many optimizer steps.",
            section=train,
        ),
        "learning_rate": Param(
            d["learning_rate"],
            type="number",
            exclusiveMinimum=0,
            maximum=1,
            title="Learning rate",
            section=train,
        ),
        "num_processes": Param(
            d["num_processes"],
            type="integer",
            minimum=1,
            maximum=64,
            title="Processes (GPUs)",
            description="> 1 launches DDP/FSDP through accelerate.",
            section=train,
        ),
        "gate_min_improvement": Param(
            d["gate_min_improvement"],
            type="number",
            title="Min improvement over base",
            description="Lower CI bound of candidate - base on the primary metric must exceed this.",
            section=gate,
        ),
        "gate_max_regression": Param(
            d["gate_max_regression"],
            type="number",
            minimum=0,
            maximum=1,
            title="Max regression vs champion",
            section=gate,
        ),
        "gate_on_fail": Param(
            d["gate_on_fail"],
            enum=["skip", "fail"],
            title="When the gate fails",
            description="skip: export/register are skipped with the reason logged; fail: the run fails.",
            section=gate,
        ),
        "promote": Param(
            d["promote"], type="boolean", title="Promote to champion if the gate passes", section=reg
        ),
        "require_approval": Param(
            d["require_approval"],
            type="boolean",
            title="Require human approval before promotion",
            section=reg,
        ),
    }


def overrides_from_params(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Trigger-form values -> config overrides (unknown form fields are ignored by Airflow's own check)."""
    return [(PARAM_KEYS[name], value) for name, value in params.items() if name in PARAM_KEYS]


def run_dir_for(run_id: str) -> Path:
    """runs/<run id>, with characters that are awkward in paths replaced."""
    return RUNS_ROOT / re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("._")


def start_run(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The DAG's first task: effective config (params.yaml + trigger form), run dir, base model."""
    from tasks.runners.pipeline import prepare_run

    cfg = load_config(PARAMS_FILE, overrides_from_params(params))
    return prepare_run(cfg, run_dir_for(run_id))


def execute_stage(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """Run one stage for a prepared run; a user error fails the task without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.runners.pipeline import load_run_config, run_stage

    run_dir = Path(run["run_dir"])
    try:
        return run_stage(name, load_run_config(run_dir), run_dir)
    except StoreUnavailable:  # a registry or remote that may come back: let Airflow retry the task
        raise
    except UserError as exc:  # bad data or params: retrying cannot help
        raise AirflowFailException(f"{name}: {exc}") from None


def check_gate(run: dict[str, Any]) -> bool:
    """The gate task: True lets merge/export/register run; False skips them with the reasons logged."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.core.layout import read_gate
    from tasks.runners.pipeline import load_run_config

    run_dir = Path(run["run_dir"])
    gate = read_gate(run_dir)
    for rule in gate.get("rules", []):
        log.info(
            "gate rule %-28s %s value=%s threshold=%s %s",
            rule.get("name"),
            "PASS" if rule.get("passed") else "FAIL",
            rule.get("value"),
            rule.get("threshold"),
            rule.get("detail", ""),
        )
    if gate["passed"]:
        log.info("gate PASSED: the candidate goes on to merge, export and registration")
        return True
    reasons = "; ".join(gate.get("reasons", [])) or f"see {run_dir / 'eval' / 'gate.json'}"
    if load_run_config(run_dir).gate.on_fail == "fail":
        raise AirflowFailException(f"gate FAILED: {reasons}")
    log.warning(
        "gate FAILED: %s. Merge, export and register are skipped; the champion is unchanged.", reasons
    )
    return False


def approval_required(run: dict[str, Any]) -> bool:
    """True when a person must approve before the registered candidate becomes champion."""
    from tasks.runners.pipeline import load_run_config

    cfg = load_run_config(Path(run["run_dir"]))
    needed = cfg.register.promote and cfg.register.require_approval
    if not needed:
        log.info("no approval step: promotion (if any) happened at registration")
    return needed


def promote_after_approval(run: dict[str, Any]) -> dict[str, Any]:
    """Promote this run's registered version after a person approved it (check-and-set in the registry)."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.runners.pipeline import load_run_config
    from tasks.stages import register

    run_dir = Path(run["run_dir"])
    try:
        return register.promote_run(load_run_config(run_dir), run_dir, actor="airflow-approval")
    except UserError as exc:
        raise AirflowFailException(f"promote: {exc}") from None


def train_task_kwargs(cfg: Config) -> dict[str, Any]:
    """Operator arguments that send the train task to the GPU node (Celery queue/pool or a k8s pod)."""
    o = cfg.orchestrate
    kwargs: dict[str, Any] = {
        "retries": o.train_retries,
        "retry_delay": timedelta(minutes=o.retry_delay_minutes),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=o.retry_delay_minutes * 8),
        "execution_timeout": timedelta(minutes=o.train_timeout_minutes),
    }
    if o.train_pool:
        kwargs["pool"] = o.train_pool
    if o.train_target == "celery":
        kwargs["queue"] = o.train_queue
    elif o.train_target == "kubernetes":
        kwargs["executor_config"] = {"pod_override": _gpu_pod(cfg)}
    return kwargs


def _gpu_pod(cfg: Config) -> Any:
    """A pod override requesting AMD GPUs on an MI300X node (KubernetesExecutor)."""
    try:
        from kubernetes.client import models as k8s
    except ImportError:
        raise UserError(
            "orchestrate.train_target: kubernetes needs the kubernetes client: "
            "pip install 'qa-lora[kubernetes]' (apache-airflow-providers-cncf-kubernetes)"
        ) from None
    k = cfg.orchestrate.kubernetes
    gpus = {k.gpu_resource: str(k.gpus)}
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(namespace=k.namespace, labels={"app": "qa-lora", "stage": "train"}),
        spec=k8s.V1PodSpec(
            node_selector=dict(k.node_selector),
            tolerations=[k8s.V1Toleration(**t) for t in k.tolerations],
            containers=[
                k8s.V1Container(
                    name="base",  # the KubernetesExecutor's worker container
                    image=k.image,
                    resources=k8s.V1ResourceRequirements(limits=gpus, requests=gpus),
                )
            ],
        ),
    )


def schedule_for(cfg: Config, dataset: Any) -> Any:
    """Cron, data-aware (the Q&A dataset Asset), both, or manual only."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    cron = cfg.orchestrate.schedule
    on_data = cfg.orchestrate.trigger_on_dataset
    if cron and on_data:
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[dataset])
    if cron:
        return CronTriggerTimetable(cron, timezone="UTC")
    return [dataset] if on_data else None


def dataset_asset(cfg: Config) -> Any:
    """The Q&A dataset as an Airflow Asset: a producer DAG that updates it triggers retraining."""
    from airflow.sdk import Asset

    return Asset(name="qa_lora_dataset", uri=cfg.resolve(cfg.data.source).as_uri())


def refresh_dataset(cfg: Config) -> dict[str, Any]:
    """The example producer: rebuild data.source from the bundled builder; report rows and hash."""
    import hashlib
    import subprocess
    import sys

    target = cfg.resolve(cfg.data.source)
    builder = REPO_ROOT / "data" / "build_qa_dataset.py"
    subprocess.run([sys.executable, str(builder), "--out", str(target)], check=True)
    data = target.read_bytes()
    return {"path": str(target), "rows": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}


def notify(context: dict[str, Any]) -> None:
    """Success/failure hook: one summary line in the log and in runs/notifications.jsonl.

    Swap in an Airflow notifier (Slack, SMTP) in production by adding it to the DAG's callbacks.
    """
    import json
    from datetime import UTC, datetime

    dag_run = context.get("dag_run")
    ti = context.get("task_instance") or context.get("ti")
    state = str(getattr(dag_run, "state", "unknown"))
    run_id = getattr(dag_run, "run_id", "unknown")
    record = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "dag_id": DAG_ID,
        "run_id": run_id,
        "state": state,
        "failed_task": getattr(ti, "task_id", None) if "fail" in state else None,
        "reason": str(context.get("reason") or context.get("exception") or ""),
        "run_dir": str(run_dir_for(run_id)),
    }
    log.info("qa-lora run %s finished: %s", run_id, state)
    RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    with (RUNS_ROOT / "notifications.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def default_config() -> Config:
    """params.yaml (or $QA_LORA_PARAMS) as the DAG's defaults."""
    return load_config(PARAMS_FILE)
