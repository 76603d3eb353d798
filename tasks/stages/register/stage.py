"""`qa-lora register`: put the exported model in the MLflow model registry with its lineage; promote it.

Readable top to bottom: check the run directory (lineage.py) -> upload one MLflow run (upload.py) ->
(under the registry lock) find-or-create the model version -> aliases (champion.py) -> registration.json.

* Nothing is registered unless the gate passed (read_gate(require_pass=True)) and every required
  artifact is complete: a refusal is a UserError raised before MLflow is touched.
* A version is auto-promoted at most once, so an Airflow retry never undoes a rollback.
* Approval: the DAG registers (the version stays `candidate`, promotion pending), waits for a person,
  then calls :func:`promote_run`, which applies the same check-and-set as :func:`promote_version`.
* Nothing written here holds a credential: the tracking URI in registration.json is redacted, and so
  are the tags and the audit lines (see champion.py and lineage.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json, write_json_atomic
from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout, read_gate
from tasks.core.redact import redact_obj, redact_uri
from tasks.plumbing.registry import CANDIDATE, CHAMPION, RUN_ID_TAG, TAG, alias_version
from tasks.plumbing.tracking import resolve_tracking_uri, setup_mlflow
from tasks.stages.register.champion import (
    AUDIT_HEADER,
    mark_not_promoted,
    move_champion,
    promote_version,
    registry_lock,
    stale_gate_reason,
)
from tasks.stages.register.lineage import build_lineage, check_inputs, norm_version, optional_reports
from tasks.stages.register.upload import ensure_registered_model, find_or_create_version, upload_run

log = logging.getLogger("qa_lora.register")


def register_model(cfg: Config, run_dir: Path, *, promote: bool | None = None) -> dict[str, Any]:
    """Register this run's model (adapter, merged, ONNX, reports) as one version; promote it if allowed.

    Args:
        cfg: the pipeline configuration (`register` section: tracking URI, model name, promotion).
        run_dir: the run directory holding train/, eval/, export/ and version.json.
        promote: override for promotion: None follows `register.promote` (and waits when
            `register.require_approval` is set); False registers only (the DAG promotes after approval
            through :func:`promote_version`); True promotes when the gate and the champion check allow.

    Returns:
        The content of run_dir/register/registration.json: version, aliases, whether it was promoted
        and why, the URIs and the lineage tags.

    Raises:
        UserError: the gate failed or is missing, or a required artifact is missing or incomplete
            (nothing is registered, no alias moves); the registry lock could not be taken.
    """
    layout = RunLayout.of(run_dir)
    gate = read_gate(layout.root, require_pass=True)
    check_inputs(layout)
    lineage = build_lineage(cfg, layout, gate)
    name = cfg.register.model_name
    log.info("registering run %s as a version of %r", lineage[RUN_ID_TAG], name)

    setup_mlflow(cfg)
    from mlflow import MlflowClient

    client = MlflowClient()
    mlflow_run_id, artifact_uri = upload_run(client, cfg, layout, lineage, gate)
    want = promote if promote is not None else cfg.register.promote and not cfg.register.require_approval
    expected = norm_version(gate.get("champion_version"))
    with registry_lock(cfg):
        ensure_registered_model(client, name, AUDIT_HEADER)
        mv, created = find_or_create_version(client, name, artifact_uri, mlflow_run_id, lineage)
        version = str(mv.version)
        candidate = alias_version(client, name, CANDIDATE)
        if candidate is None or int(candidate) <= int(version):
            client.set_registered_model_alias(name, CANDIDATE, version)
        champion_before = alias_version(client, name, CHAMPION)
        status, reason = _promotion(client, cfg, version, lineage, champion_before, expected, want, promote)
        outcome = {
            "version": version,
            "created": created,
            "aliases": sorted(client.get_model_version(name, version).aliases),
            "promoted": status == "promoted",
            "promotion": status,
            "reason": reason,
            "gate_champion_version": expected,
            "champion_before": champion_before,
            "champion_after": alias_version(client, name, CHAMPION),
            "mlflow_run_id": mlflow_run_id,
        }
    log.info("version %s of %r: %s (%s)", version, name, status, reason)
    result = _registration(cfg, layout, lineage, outcome, artifact_uri)
    write_json_atomic(layout.registration, result)
    return result


def _promotion(
    client: Any,
    cfg: Config,
    version: str,
    lineage: dict[str, str],
    champion: str | None,
    expected: str | None,
    want: bool,
    promote: bool | None,
) -> tuple[str, str]:
    """Decide and apply this version's promotion (under the registry lock): (status, reason)."""
    name = cfg.register.model_name
    tags = client.get_model_version(name, version).tags
    if champion == version:
        return "promoted", "already the champion (an earlier attempt promoted it)"
    if f"{TAG}promoted_at" in tags:
        # Auto-promotion happens once: this version was champion before and was replaced or rolled
        # back since; a retry must not undo that. A person can still `qa-lora promote` it.
        status = "skipped"
        reason = f"was champion before (promoted {tags[f'{TAG}promoted_at']}); not re-promoted automatically"
    elif not want:
        status = "pending"
        reason = (
            f"awaiting approval: `qa-lora promote {version}` moves the champion"
            if promote is None and cfg.register.promote
            else "promotion not requested here (register.promote=false, or the caller promotes after "
            "approval with promote_version)"
        )
    elif champion != expected:
        status, reason = "refused", stale_gate_reason(expected, champion)
    else:
        run_id = lineage[RUN_ID_TAG]
        move_champion(client, name, version, actor="qa-lora register", reason=f"gate passed (run {run_id})")
        return "promoted", f"gate passed against {expected or 'no champion'}"
    mark_not_promoted(client, name, version, status, reason)
    return status, reason


def _registration(
    cfg: Config, layout: RunLayout, lineage: dict[str, str], outcome: dict[str, Any], source: str
) -> dict[str, Any]:
    """registration.json's record (credentials redacted: the tracking URI may carry a password)."""
    name, version = cfg.register.model_name, outcome["version"]
    record = {
        "model_name": name,
        "run_id": lineage[RUN_ID_TAG],
        **outcome,
        "tracking_uri": redact_uri(resolve_tracking_uri(cfg.register.tracking_uri)),
        "uris": {
            "version": f"models:/{name}/{version}",
            "candidate": f"models:/{name}@{CANDIDATE}",
            "champion": f"models:/{name}@{CHAMPION}",
            "source": source,
        },
        "missing_reports": [
            str(path.relative_to(layout.root)) for path in optional_reports(layout) if not path.is_file()
        ],
        "tags": lineage,
    }
    return redact_obj(record)


def promote_run(
    cfg: Config, run_dir: Path, *, actor: str, reason: str = "approved before promotion"
) -> dict[str, Any]:
    """Promote the version this run registered (after an approval), with the champion check-and-set.

    Reads run_dir/register/registration.json (written by :func:`register_model`), promotes only while
    the champion is still the one the run's gate compared against, and rewrites registration.json
    with the outcome.

    Args:
        cfg: the configuration (`register` section).
        run_dir: the run directory whose registration is promoted.
        actor: who approved (kept in the version's tags and the audit log).
        reason: why (kept likewise).

    Returns:
        The updated registration record (see :func:`register_model`).

    Raises:
        UserError: this run has no registration (register first), or its version no longer exists.
    """
    path = RunLayout.of(run_dir).registration
    if not path.is_file():
        raise UserError(f"{path}: missing; run `qa-lora register` for this run before promoting it")
    record = read_json(path)
    out = promote_version(cfg, record["version"], reason=reason, actor=actor, if_champion_unchanged=True)
    setup_mlflow(cfg)
    from mlflow import MlflowClient

    record.update(
        promoted=out["promoted"],
        promotion="promoted" if out["promoted"] else "refused",
        reason=out["reason"],
        champion_after=out["champion"],
        aliases=sorted(MlflowClient().get_model_version(cfg.register.model_name, record["version"]).aliases),
    )
    record = redact_obj(record)
    write_json_atomic(path, record)
    return record
