"""What the Airflow DAG needs beyond wiring: trigger-form Params, run set-up, gate decision, routing.

Kept out of dags/ so the DAG file only wires, and light: this module imports only the standard library,
yaml and pydantic at top level (the DAG processor parses the DAG file often). Airflow itself is
imported inside functions, so the module is usable (and tested) as plain Python.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json
from tasks.core.config import REPO_ROOT, Config, load_config
from tasks.core.errors import StoreUnavailable, UserError
from tasks.core.layout import GateFailed, RunLayout

log = logging.getLogger("qa_lora.dag")

DAG_ID = "qa_lora_finetune"
# A deployment (or a test) can point the DAG at another params file and runs root without editing it.
PARAMS_FILE = os.environ.get("QA_LORA_PARAMS") or None
RUNS_ROOT = Path(os.environ.get("QA_LORA_RUNS_ROOT") or REPO_ROOT / "runs")
# The train task's pool when orchestrate.train_pool is unset: `make airflow` creates it with one slot.
TRAIN_POOL = "qa_lora_train"
# Active runs of the DAG. 1 by default; a deployment with a training pool may admit more, the pool then
# keeps training to one at a time per slot while the other stages of other runs proceed.
MAX_ACTIVE_RUNS = int(os.environ.get("QA_LORA_MAX_ACTIVE_RUNS") or 1)

# Trigger-form field -> config key. The form's defaults come from params.yaml; values a user changes
# become overrides for that run only, and the effective config is saved in the run directory.
PARAM_KEYS: dict[str, str] = {
    "base_model": "base.name_or_path",
    "base_kind": "base.kind",
    "chat_template": "prompt.template",
    "data_source": "data.source",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_modules_to_save": "lora.modules_to_save",
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
    """The DAG's Params: the trigger form, generated from the config schema (tasks/runners/trigger_form.py).

    Args:
        cfg: the defaults (params.yaml).

    Returns:
        name -> airflow.sdk.Param, with the config's titles, sections, enums and bounds.
    """
    from tasks.runners.trigger_form import form_params

    return form_params(cfg, PARAM_KEYS)


def overrides_from_params(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Trigger-form values -> config overrides.

    Raises:
        UserError: a key that is no form field (Airflow accepts any conf key and would ignore it).
    """
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise UserError(
            f"trigger conf: unknown key {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(sorted(PARAM_KEYS))}"
        )
    return [(PARAM_KEYS[name], value) for name, value in params.items()]


def _mask_credentials(*texts: str) -> None:
    """Keep credentials out of this task's log, which every UI user can read.

    Records made by Python's logging (ours and the libraries') are redacted where they are made
    (`install_redaction`); Airflow's own lines (a failed task's traceback) go through its masker, which
    is told each credential: those of secret environment variables and of URIs in `texts`.
    """
    from airflow.sdk.log import mask_secret

    from tasks.core.logs import install_redaction
    from tasks.core.redact import credentials_in

    install_redaction()
    for secret in credentials_in(*texts):
        mask_secret(secret)


@contextmanager
def _fails_once(task: str) -> Iterator[None]:
    """A user error (bad data or params: retrying cannot help) fails the task once, in one line naming
    the task; an unavailable registry or remote (StoreUnavailable) is left to Airflow's retries. The
    task's log masks credentials from here on."""
    from airflow.sdk.exceptions import AirflowFailException

    _mask_credentials()
    try:
        yield
    except StoreUnavailable:
        raise
    except UserError as exc:
        raise AirflowFailException(f"{task}: {exc}") from None


def run_dir_for(run_id: str) -> Path:
    """runs/<run id>, with characters that are awkward in paths replaced."""
    return RUNS_ROOT / re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("._")


def start_run(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The DAG's first task: effective config (params.yaml + trigger form), run dir, base model.

    A user error (unknown conf key, a value the config refuses, a data source outside the allowed roots)
    fails the task once, without retries, with one line naming the key or file.
    """
    from tasks.runners.lifeline import end_with_parent
    from tasks.runners.pipeline import prepare_run

    end_with_parent()
    with _fails_once("prepare"):
        cfg = load_config(PARAMS_FILE, overrides_from_params(params))
        _mask_credentials(json.dumps(cfg.to_dict()))  # a deployment's params file may hold a credentialed URI
        return prepare_run(cfg, run_dir_for(run_id))


def execute_stage(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """Run one stage for a prepared run; a user error fails the task without retries."""
    from tasks.runners.lifeline import end_with_parent
    from tasks.runners.lineage import airflow_task_parent
    from tasks.runners.pipeline import load_run_config, run_stage

    end_with_parent()  # training (and torchrun's workers) must not outlive a killed worker
    run_dir = Path(run["run_dir"])
    with _fails_once(name):
        cfg = load_run_config(run_dir)
        try:
            if name == "train" and cfg.orchestrate.train_target == "kubernetes" and cfg.train.nnodes > 1:
                from tasks.runners.kubernetes import train_on_nodes  # one pod per node, an indexed Job

                result = train_on_nodes(cfg, run_dir)
            else:
                result = run_stage(name, cfg, run_dir, airflow_task_parent())
        except GateFailed as exc:  # the export's serving rules: like the gate task, skip unless told to fail
            _tell("refused", _current_run_id(run), str(exc), {"run_dir": str(run_dir)})
            if cfg.gate.on_fail == "fail":
                raise
            from airflow.sdk.exceptions import AirflowSkipException

            log.warning("%s. Register is skipped; the champion is unchanged.", exc)
            raise AirflowSkipException(f"{name}: {exc}") from None
    if name == "register":
        _tell_champion(run, result)
    return result


def check_gate(run: dict[str, Any]) -> bool:
    """The gate task: True lets merge/export/register run; False skips them with the reasons logged."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.core.layout import read_gate
    from tasks.runners.pipeline import load_run_config

    _mask_credentials()
    run_dir = Path(run["run_dir"])
    try:
        gate = read_gate(run_dir)
    except UserError as exc:
        raise AirflowFailException(f"gate: {exc}") from None
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
    report = str(RunLayout.of(run_dir).eval_report)
    _tell(
        "refused",
        _current_run_id(run),
        f"gate FAILED: {reasons}",
        {"report": report, "run_dir": str(run_dir)},
    )
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


def retain(run: dict[str, Any]) -> dict[str, Any]:
    """The DAG's last task: retention (runtime.keep_runs / keep_gb) around this run, which it never deletes."""
    from tasks.runners.pipeline import load_run_config
    from tasks.runners.retention import collect_garbage

    run_dir = Path(run["run_dir"])
    with _fails_once("retention"):
        return collect_garbage(load_run_config(run_dir), run_dir)


def promote_after_approval(run: dict[str, Any]) -> dict[str, Any]:
    """Promote this run's registered version after a person approved it (check-and-set in the registry)."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.runners.pipeline import load_run_config
    from tasks.stages import register

    _mask_credentials()
    run_dir = Path(run["run_dir"])
    try:
        registration = register.promote_run(load_run_config(run_dir), run_dir, actor="airflow-approval")
    except UserError as exc:
        raise AirflowFailException(f"promote: {exc}") from None
    _tell_champion(run, registration)
    return registration


def sweep_params(cfg: Config) -> dict[str, Any]:
    """The sweep DAG's form: the run's fields plus `sweep`, a list of recipe overrides (one per candidate)."""
    from airflow.sdk import Param

    example = [
        {"lora.r": cfg.lora.r},
        {"lora.r": cfg.lora.r * 2, "train.learning_rate": cfg.train.learning_rate},
    ]
    sweep = Param(
        example,
        type="array",
        items={"type": "object"},
        minItems=1,
        title="Sweep points",
        description="One object of lora.* / train.* overrides per candidate; the best by the gate's "
        "primary metric goes on to the gate, export and register.",
    )
    return {**trigger_params(cfg), "sweep": sweep}


def start_sweep(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The sweep DAG's first task: the run (as `start_run`) and its checked sweep points."""
    from tasks.runners.sweep import sweep_points

    params = dict(params)
    with _fails_once("prepare"):
        points = sweep_points(params.pop("sweep", None))
    return {**start_run(params, run_id), "sweep": points}


def sweep_candidates(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One candidate run per sweep point (what training and evaluation are mapped over)."""
    from tasks.runners.sweep import prepare_candidates

    with _fails_once("candidates"):
        return prepare_candidates(Path(run["run_dir"]), run["sweep"])


def pick_sweep_winner(run: dict[str, Any], candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The best evaluated candidate becomes the run's; the gate, export and register follow on it."""
    from tasks.runners.sweep import pick_winner

    with _fails_once("pick_winner"):
        return pick_winner(Path(run["run_dir"]), candidates)


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
    # One training at a time per pool slot (two CPU trainings sharing cores run ~50x slower each).
    kwargs["pool"] = o.train_pool or TRAIN_POOL
    if o.train_target == "celery":
        kwargs["queue"] = o.train_queue
    elif o.train_target == "kubernetes" and cfg.train.nnodes == 1:  # more nodes: the task starts a Job
        from tasks.runners.kubernetes import gpu_pod

        kwargs["executor_config"] = {"pod_override": gpu_pod(cfg)}
    return kwargs


def schedule_for(cfg: Config, dataset: Any) -> Any:
    """Cron, data-aware (the Q&A dataset Asset), both, or manual only.

    The cron timetable never starts a run for a slot in the past when the DAG is first unpaused: the DAG
    has no start_date (with one, Airflow ignores `run_immediately`), and `run_immediately` is a zero
    window: `False` still runs the past slot when it is less than a tenth of the period old (Airflow
    3.3's `_calc_first_run`), i.e. up to 16.8 hours after a weekly slot.
    """
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    cron = cfg.orchestrate.schedule
    on_data = cfg.orchestrate.trigger_on_dataset
    timetable = CronTriggerTimetable(cron, timezone="UTC", run_immediately=timedelta(0)) if cron else None
    if timetable and on_data:
        return AssetOrTimeSchedule(timetable=timetable, assets=[dataset])
    if timetable:
        return timetable
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
    """The DAG's success/failure callback: a failed run is told (orchestrate.notify), every run recorded."""
    dag_run = context.get("dag_run")
    ti = context.get("task_instance") or context.get("ti")
    state = str(getattr(dag_run, "state", "unknown"))
    run_id = getattr(dag_run, "run_id", "unknown")
    run_dir = run_dir_for(run_id)  # named only when it exists: a run refused at `prepare` never made it
    failed = "fail" in state
    facts = {
        "dag_id": getattr(dag_run, "dag_id", DAG_ID),
        "state": state,
        "failed_task": getattr(ti, "task_id", None) if failed else None,
        "run_dir": str(run_dir) if run_dir.is_dir() else None,
    }
    reason = str(context.get("reason") or context.get("exception") or "") or state
    from tasks.runners.notifications import told

    # gate.on_fail: fail makes a refused candidate fail the run (its gate or export task): when the refusal
    # reached someone, it was the notice; a failure of any other task is told as ever
    refusal = failed and facts["failed_task"] in ("gate", "export")
    send = not (refusal and told(RUNS_ROOT / "notifications.jsonl", run_id, "refused"))
    if not send:
        log.info(
            "run %s failed on its refused candidate, which was told: the failure is only recorded", run_id
        )
    _tell("failed" if failed else "succeeded", run_id, reason, facts, context, send=send)


def tell_approval_waiting(context: dict[str, Any]) -> None:
    """The approval task's notifier: a registered candidate waits for a person."""
    run_id = str(context.get("run_id"))
    layout = RunLayout.of(run_dir_for(run_id))
    version = read_json(layout.registration).get("version") if layout.registration.is_file() else None
    reason = f"version {version} is registered as candidate: approve or reject its promotion to champion"
    facts = {"version": version, "report": str(layout.eval_report), "task": "approve_promotion"}
    _tell("approval", run_id, reason, facts, context)


def _tell(
    event: str, run_id: str, reason: str, facts: dict[str, Any], context: Any = None, send: bool = True
) -> None:
    """Tell of `event` through orchestrate.notify's channels (`send=False`: the journal line only)."""
    from tasks.runners.notifications import Notice, deliver

    journal = RUNS_ROOT / "notifications.jsonl"
    notify = default_config().orchestrate.notify
    notify = notify if send else notify.model_copy(update={"events": ()})
    deliver(Notice(event, run_id, reason, facts), notify, journal, context)


def _current_run_id(run: dict[str, Any]) -> str:
    """The Airflow run id inside a task; the run directory's name elsewhere (a test calling directly)."""
    from airflow.sdk import get_current_context

    try:
        return str(get_current_context()["run_id"])
    except RuntimeError:
        return Path(run["run_dir"]).name


def _tell_champion(run: dict[str, Any], registration: dict[str, Any]) -> None:
    """A new champion (once: a retried task that finds itself champion already says nothing)."""
    if registration.get("promoted") and registration.get("champion_before") != registration.get("version"):
        reason = (
            f"version {registration['version']} is the champion (was {registration.get('champion_before')})"
        )
        facts = {"model": registration.get("uris", {}).get("champion"), "version": registration["version"]}
        _tell("champion", _current_run_id(run), reason, facts)


def default_config() -> Config:
    """params.yaml (or $QA_LORA_PARAMS) as the DAG's defaults."""
    return load_config(PARAMS_FILE)
