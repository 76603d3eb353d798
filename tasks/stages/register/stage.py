"""`qa-lora register`: put the exported model in the MLflow model registry with its lineage; promote it.

Readable top to bottom: check the run directory -> derive the lineage -> upload one MLflow run ->
(under the registry lock) find-or-create the model version -> aliases -> registration.json.

* What a version carries: one MLflow run per pipeline run, whose artifact directory `model/` holds
  `adapter/`, `merged/`, `onnx/`, `reports/` (gate, metrics, summaries, data quality, effective params)
  and the model card as `README.md`. The version's source is that directory, so downloading
  `models:/NAME@champion` gives back the whole tree. (`mlflow.register_model("runs:/...")` expects an
  MLflow-flavoured model; `create_model_version(source=<artifact uri>)` registers a plain tree.)
* Nothing is registered unless the gate passed (run_dir/eval/gate.json) and every required artifact is
  complete: a refusal is a UserError raised before MLflow is touched.
* Pipeline run id (the idempotence key): `<run_dir name>-<first 12 hex of the adapter weights' sha256>`.
  The DAG's run_dir is `runs/<dag run id>`, so an Airflow retry maps to the same version, while a new
  `qa-lora run` into the same `runs/local` (new weights) is a new version instead of a stale match.
* Aliases: `candidate` = the newest registered version; `champion` moves only when the gate passed and
  promotion is on (register.promote, no pending approval); the champion it replaces becomes `previous`.
  A version is auto-promoted at most once, so an Airflow retry never undoes a rollback.
* Check-and-set: the gate compared the candidate against one champion (gate.json `champion_version`).
  MLflow has no conditional alias update, so reading the champion and moving it happen under a file
  lock (beside the SQLite database; keyed by the registry URI in the temp dir for a server registry,
  which then only serialises one machine: give the DAG's register task a one-slot pool there). A
  candidate whose champion changed since stays `candidate`, with a tag saying why.
* Approval: the DAG registers (the version stays `candidate`, promotion pending), waits for a person,
  then calls :func:`promote_run`, which applies the same check-and-set.
* Audit: every alias move tags the versions involved (who, when, why) and appends a line to the
  registered model's description; `qa_lora.champion_history` (a registered-model tag) is the stack
  that `rollback` pops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, read_json, write_json_atomic
from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import UserError
from tasks.plumbing.tracking import resolve_tracking_uri, setup_mlflow

log = logging.getLogger("qa_lora.register")

ARTIFACT_PATH = "model"  # the one artifact directory of the MLflow run that a version points at
CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
TAG = "qa_lora."
RUN_ID_TAG = f"{TAG}run_id"
HISTORY_TAG = f"{TAG}champion_history"
AUDIT_HEADER = "qa-lora model registry entry. Champion audit log (newest last):"
AUDIT_KEEP = 50  # audit lines kept in the description; version tags keep each event for good
HISTORY_KEEP = 100
LOCK_TIMEOUT_S = 600.0
MARKER = ".qa_lora_champion.json"  # in fetch_champion's dest: which version is already there

# run_dir-relative inputs. Required: what identifies the model and justifies registering it.
_ADAPTER, _MERGED, _ONNX = "train/adapter", "export/merged", "export/onnx"
_GATE, _METRICS = "eval/gate.json", "eval/metrics.json"
_VERSION, _EXPORT_SUMMARY, _MODEL_CARD = "version.json", "export/export_summary.json", "export/README.md"
# Optional reports: logged when present, listed as missing in registration.json otherwise.
_OPTIONAL = {
    "train/train_summary.json": "train_summary.json",
    "reports/data_quality.json": "data_quality.json",
    "params.effective.yaml": "params.effective.yaml",
}


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
    run_dir = Path(run_dir).resolve()
    gate = _check_gate(run_dir / _GATE)
    _check_inputs(run_dir)
    lineage = _lineage(cfg, run_dir, gate)
    run_id = lineage[RUN_ID_TAG]
    name = cfg.register.model_name
    log.info("registering run %s as a version of %r", run_id, name)

    setup_mlflow(cfg)
    from mlflow import MlflowClient

    client = MlflowClient()
    mlflow_run_id, artifact_uri = _upload_run(client, cfg, run_dir, lineage, gate)

    want = promote if promote is not None else cfg.register.promote and not cfg.register.require_approval
    expected = _norm_version(gate.get("champion_version"))
    with _registry_lock(cfg):
        _ensure_registered_model(client, name)
        mv, created = _find_or_create_version(client, name, run_id, artifact_uri, mlflow_run_id, lineage)
        version = str(mv.version)
        candidate = _alias(client, name, CANDIDATE)
        if candidate is None or int(candidate) <= int(version):
            client.set_registered_model_alias(name, CANDIDATE, version)
        champion_before = _alias(client, name, CHAMPION)
        tags = client.get_model_version(name, version).tags
        if champion_before == version:
            promoted, status, reason = (
                True,
                "promoted",
                "already the champion (an earlier attempt promoted it)",
            )
        elif f"{TAG}promoted_at" in tags:
            # Auto-promotion happens once: this version was champion before and was replaced or rolled
            # back since; a retry must not undo that. A person can still `qa-lora promote` it.
            promoted, status = False, "skipped"
            reason = (
                f"was champion before (promoted {tags[f'{TAG}promoted_at']}); not re-promoted automatically"
            )
        elif not want:
            promoted, status = False, "pending"
            reason = (
                f"awaiting approval: `qa-lora promote {version}` moves the champion"
                if promote is None and cfg.register.promote
                else "promotion not requested here (register.promote=false, or the caller promotes after "
                "approval with promote_version)"
            )
        elif champion_before != expected:
            promoted, status = False, "refused"
            reason = (
                f"champion changed since the gate ran: the gate compared against {expected or 'no champion'}, "
                f"the champion is now {champion_before or 'unset'}; not promoted over it"
            )
        else:
            _move_champion(
                client, name, version, actor="qa-lora register", reason=f"gate passed (run {run_id})"
            )
            promoted, status, reason = True, "promoted", f"gate passed against {expected or 'no champion'}"
        if status != "promoted":
            client.set_model_version_tag(name, version, f"{TAG}promotion", status)
            client.set_model_version_tag(name, version, f"{TAG}promotion_reason", reason)
        champion_after = _alias(client, name, CHAMPION)
        aliases = sorted(client.get_model_version(name, version).aliases)
    log.info("version %s of %r: %s (%s)", version, name, status, reason)

    result: dict[str, Any] = {
        "model_name": name,
        "version": version,
        "run_id": run_id,
        "created": created,
        "aliases": aliases,
        "promoted": promoted,
        "promotion": status,
        "reason": reason,
        "gate_champion_version": expected,
        "champion_before": champion_before,
        "champion_after": champion_after,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": resolve_tracking_uri(cfg.register.tracking_uri),
        "uris": {
            "version": f"models:/{name}/{version}",
            "candidate": f"models:/{name}@{CANDIDATE}",
            "champion": f"models:/{name}@{CHAMPION}",
            "source": artifact_uri,
        },
        "missing_reports": [p for p in _OPTIONAL if not (run_dir / p).is_file()],
        "tags": lineage,
    }
    write_json_atomic(run_dir / "register" / "registration.json", result)
    return result


def promote_version(
    cfg: Config, version: str, reason: str, actor: str, *, if_champion_unchanged: bool = False
) -> dict[str, Any]:
    """Move the champion alias to `version` (the old champion becomes `previous`), recording who and why.

    Args:
        cfg: the configuration (`register` section).
        version: the registered model version number.
        reason: why (kept in the version's tags and the model's audit log).
        actor: who (a user name, or the approver from the DAG).
        if_champion_unchanged: check-and-set: promote only while the champion is still the one this
            version's gate compared against (what the DAG passes after an approval wait).

    Returns:
        {"model_name", "version", "promoted", "reason", "champion", "previous"}.

    Raises:
        UserError: the model or the version does not exist.
    """
    setup_mlflow(cfg)
    from mlflow import MlflowClient

    client = MlflowClient()
    name, version = cfg.register.model_name, str(version).strip()
    with _registry_lock(cfg):
        mv = _get_version(client, name, version)
        current = _alias(client, name, CHAMPION)
        expected = _norm_version(mv.tags.get(f"{TAG}gate.champion_version"))
        if current == version:
            promoted, why = True, "already the champion"
        elif if_champion_unchanged and current != expected:
            promoted = False
            why = (
                f"champion changed since the gate ran: the gate compared against {expected or 'no champion'}, "
                f"the champion is now {current or 'unset'}; not promoted over it"
            )
            client.set_model_version_tag(name, version, f"{TAG}promotion", "refused")
            client.set_model_version_tag(name, version, f"{TAG}promotion_reason", why)
        else:
            _move_champion(client, name, version, actor=actor, reason=reason)
            promoted, why = True, reason
        result = {
            "model_name": name,
            "version": version,
            "promoted": promoted,
            "reason": why,
            "champion": _alias(client, name, CHAMPION),
            "previous": _alias(client, name, PREVIOUS),
        }
    log.info("promote %r v%s by %s: %s", name, version, actor, "done" if promoted else why)
    return result


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
    path = Path(run_dir).resolve() / "register" / "registration.json"
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
    write_json_atomic(path, record)
    return record


def rollback_champion(cfg: Config, reason: str, actor: str) -> dict[str, Any]:
    """Move the champion alias back to `previous`, recording who and why on both versions.

    `previous` then points at the champion before that one (from the champion history), if any.

    Args:
        cfg: the configuration (`register` section).
        reason: why (kept in the versions' tags and the model's audit log).
        actor: who.

    Returns:
        {"model_name", "champion", "rolled_back", "previous", "reason", "actor"}.

    Raises:
        UserError: there is no champion, or no previous champion to go back to.
    """
    setup_mlflow(cfg)
    from mlflow import MlflowClient

    client = MlflowClient()
    name = cfg.register.model_name
    with _registry_lock(cfg):
        current = _alias(client, name, CHAMPION)
        target = _alias(client, name, PREVIOUS)
        if current is None:
            raise UserError(f"register.model_name={name!r}: no champion to roll back (nothing was promoted)")
        if target is None or target == current:
            raise UserError(
                f"register.model_name={name!r}: champion is v{current} and there is no previous champion "
                "to roll back to (use `qa-lora promote VERSION`)"
            )
        history = _history(client, name)
        while history and history[-1] == current:
            history.pop()
        if not history or history[-1] != target:
            history.append(target)
        new_previous = next((v for v in reversed(history[:-1]) if v != target), None)
        now = _now()
        # Order: champion first, then previous; a crash in between leaves previous == champion, which
        # a second rollback refuses instead of bouncing between two versions.
        client.set_registered_model_alias(name, CHAMPION, target)
        if new_previous is None:
            client.delete_registered_model_alias(name, PREVIOUS)
        else:
            client.set_registered_model_alias(name, PREVIOUS, new_previous)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))
        for key, value in (("rolled_back_by", actor), ("rolled_back_at", now), ("rollback_reason", reason)):
            client.set_model_version_tag(name, current, f"{TAG}{key}", value)
        for key, value in (("restored_by", actor), ("restored_at", now), ("restore_reason", reason)):
            client.set_model_version_tag(name, target, f"{TAG}{key}", value)
        _audit(client, name, f"{now} rollback v{current} -> v{target} by {actor}: {reason}")
    log.info("rollback %r: champion v%s -> v%s by %s (%s)", name, current, target, actor, reason)
    return {
        "model_name": name,
        "champion": target,
        "rolled_back": current,
        "previous": new_previous,
        "reason": reason,
        "actor": actor,
    }


def fetch_champion(cfg: Config, dest: Path) -> dict[str, Any] | None:
    """Download the champion's artifact tree into `dest` (reused when it already holds that version).

    Args:
        cfg: the configuration (`register` section).
        dest: a local directory, replaced atomically by the champion's tree.

    Returns:
        None when there is no champion; else {"version", "run_id" (the pipeline run id), "merged_path",
        "onnx_path", "dataset_hash", "model_name", "path"}.

    Raises:
        UserError: the champion's downloaded tree is incomplete.
    """
    setup_mlflow(cfg)
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient()
    name = cfg.register.model_name
    version = _alias(client, name, CHAMPION)
    if version is None:
        log.info("no champion for %r yet", name)
        return None
    mv = client.get_model_version(name, version)  # by number: the alias may move while we download
    dest = Path(dest).resolve()
    marker = {"model_name": name, "version": version, "source": mv.source}
    dest.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # Two runs evaluating at once may share one dest (a cache); atomic_dir's temporary is per dest.
    with FileLock(str(dest.parent / f".{dest.name}.lock"), timeout=LOCK_TIMEOUT_S):
        if not (dest / MARKER).is_file() or read_json(dest / MARKER) != marker:
            log.info("downloading champion %r v%s to %s", name, version, dest)
            with atomic_dir(dest) as tmp:
                download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
                _check_tree(tmp, f"models:/{name}/{version}")
                write_json_atomic(tmp / MARKER, marker)
    return {
        "model_name": name,
        "version": version,
        "run_id": mv.tags.get(RUN_ID_TAG),
        "path": str(dest),
        "merged_path": str(dest / "merged"),
        "onnx_path": str(dest / "onnx"),
        "dataset_hash": mv.tags.get(f"{TAG}dataset_hash"),
    }


# ---------------------------------------------------------------------------------------------- checks


def _check_gate(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: missing; the evaluate stage writes the gate decision (nothing registered)")
    gate = read_json(path)
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        raise UserError(f"{path}: expected a JSON object with a boolean 'passed' (nothing registered)")
    if not gate["passed"] or gate.get("decision", "pass") != "pass":
        reasons = "; ".join(str(r) for r in gate.get("reasons") or []) or "no reason given"
        raise UserError(f"{path}: the gate failed ({reasons}); nothing registered")
    return gate


def _check_inputs(run_dir: Path) -> None:
    """Refuse (UserError naming the path) unless every required artifact is there and complete."""
    for rel in (_METRICS, _VERSION, _EXPORT_SUMMARY, _MODEL_CARD):
        _require_file(run_dir / rel, "a required artifact (nothing registered)")
    dataset_hash = read_json(run_dir / _VERSION).get("dataset_hash")
    if not isinstance(dataset_hash, str) or not dataset_hash:
        raise UserError(
            f"{run_dir / _VERSION}: 'dataset_hash' must be a non-empty string (nothing registered)"
        )
    _check_tree_parts(run_dir / _ADAPTER, run_dir / _MERGED, run_dir / _ONNX)


def _check_tree(root: Path, where: str) -> None:
    """A downloaded version tree is complete (same checks as at registration)."""
    try:
        _check_tree_parts(root / "adapter", root / "merged", root / "onnx")
    except UserError as exc:
        raise UserError(f"{where}: incomplete artifact tree: {exc}") from None


def _check_tree_parts(adapter: Path, merged: Path, onnx_dir: Path) -> None:
    for rel in ("adapter_config.json", "adapter_model.safetensors"):
        _require_file(adapter / rel, "part of the LoRA adapter")
    for rel in ("config.json", "tokenizer_config.json"):
        _require_file(merged / rel, "part of the merged model")
    index = merged / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        for shard in shards:
            _require_file(merged / shard, f"a shard listed in {index.name}")
    else:
        _require_file(merged / "model.safetensors", "the merged weights")
    _check_onnx_dir(onnx_dir)


def _check_onnx_dir(onnx_dir: Path) -> None:
    """The export's generation kit is there (graph, layout, tokenizer); every graph (variants in
    subdirectories too) loads without its weights and every external-data file it names is there."""
    from tasks.plumbing.onnx_generate import LAYOUT_FILE

    graphs = sorted(onnx_dir.rglob("*.onnx")) if onnx_dir.is_dir() else []
    if not graphs:
        raise UserError(f"{onnx_dir}: no .onnx graph (the export stage writes them; nothing registered)")
    for rel in (LAYOUT_FILE, "tokenizer_config.json"):
        _require_file(onnx_dir / rel, "part of the ONNX export (onnxruntime generation needs it)")
    import onnx

    for graph in graphs:
        try:
            model = onnx.load(str(graph), load_external_data=False)
        except Exception as exc:  # a truncated or foreign file: name it, one line
            raise UserError(f"{graph}: not a readable ONNX model ({type(exc).__name__})") from None
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            data = graph.parent / info.get("location", "")
            need = int(info.get("offset", 0)) + int(info.get("length", 0))
            if not data.is_file() or data.stat().st_size < need:
                raise UserError(
                    f"{graph}: external data {info.get('location')!r} for {tensor.name!r} is missing or "
                    f"shorter than {need} bytes"
                )


def _require_file(path: Path, what: str) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        raise UserError(f"{path}: missing or empty; expected {what}")


# --------------------------------------------------------------------------------------------- lineage


def _lineage(cfg: Config, run_dir: Path, gate: dict[str, Any]) -> dict[str, str]:
    """The version's tags (all strings: MLflow tags are strings)."""
    adapter_sha = _sha256(run_dir / _ADAPTER / "adapter_model.safetensors")
    commit, dirty = _git_state()
    tags = {
        # Sanitised: it goes inside quoted MLflow search filters (DAG run ids hold ':' and '+').
        RUN_ID_TAG: re.sub(r"[^A-Za-z0-9._:+-]", "_", run_dir.name) + f"-{adapter_sha[:12]}",
        f"{TAG}run_dir": str(run_dir),
        f"{TAG}dataset_hash": str(read_json(run_dir / _VERSION)["dataset_hash"]),
        f"{TAG}git_commit": commit,
        f"{TAG}git_dirty": dirty,
        f"{TAG}params_hash": cfg.params_hash(),
        f"{TAG}base_model": cfg.base.name_or_path,
        f"{TAG}base_revision": cfg.base.revision or "",
        f"{TAG}adapter_sha256": adapter_sha,
        f"{TAG}gate.decision": str(gate.get("decision", "pass")),
        f"{TAG}gate.primary_metric": str(gate.get("primary_metric", cfg.gate.primary_metric)),
        f"{TAG}gate.champion_version": _norm_version(gate.get("champion_version")) or "none",
    }
    for key, value in _key_metrics(gate).items():
        tags[f"{TAG}metric.{key}"] = f"{value:.6g}"
    return tags


def _key_metrics(gate: dict[str, Any]) -> dict[str, float]:
    """The candidate's top-level numbers from gate.json (a {"mean": x} style entry counts as x)."""
    candidate = (gate.get("metrics") or {}).get("candidate") or {}
    out: dict[str, float] = {}
    for key, value in candidate.items() if isinstance(candidate, dict) else ():
        if isinstance(value, dict):
            value = next((value[k] for k in ("mean", "value", "point") if k in value), None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_state() -> tuple[str, str]:
    """(commit, "true"/"false" dirty) of the repository; ("unknown", "unknown") outside git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    if commit.returncode != 0:
        return "unknown", "unknown"
    return commit.stdout.strip(), str(bool(status.stdout.strip())).lower()


def _norm_version(value: Any) -> str | None:
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    return str(value).strip()


# -------------------------------------------------------------------------------------------- registry


def _upload_run(
    client: Any, cfg: Config, run_dir: Path, lineage: dict[str, str], gate: dict[str, Any]
) -> tuple[str, str]:
    """One finished MLflow run holding the artifact tree; an earlier finished upload is reused.

    Runs outside the registry lock: uploading a 7B merged model takes minutes and needs no lock, and
    a crashed attempt leaves an unfinished run that is simply not reused.
    """
    run_id = lineage[RUN_ID_TAG]
    exp_id = client.get_experiment_by_name(cfg.register.experiment).experiment_id
    done = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if done:
        log.info("reusing the finished MLflow run %s for %s", done[0].info.run_id, run_id)
        return done[0].info.run_id, f"{done[0].info.artifact_uri}/{ARTIFACT_PATH}"

    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, tags=lineage, run_name=f"register-{run_id}")
    rid = run.info.run_id
    try:
        t0 = time.monotonic()
        for part, rel in (("adapter", _ADAPTER), ("merged", _MERGED), ("onnx", _ONNX)):
            client.log_artifacts(rid, str(run_dir / rel), f"{ARTIFACT_PATH}/{part}")
        client.log_artifact(rid, str(run_dir / _MODEL_CARD), ARTIFACT_PATH)
        reports = f"{ARTIFACT_PATH}/reports"
        client.log_artifacts(rid, str(run_dir / "eval"), f"{reports}/eval")
        for rel in (_VERSION, _EXPORT_SUMMARY, *_OPTIONAL):
            if (run_dir / rel).is_file():
                client.log_artifact(rid, str(run_dir / rel), reports)
        now = int(time.time() * 1000)
        flat = {f"{s}.{k}": v for s in ("lora", "train") for k, v in cfg.to_dict()[s].items()}
        client.log_batch(
            rid,
            metrics=[Metric(k, v, now, 0) for k, v in _key_metrics(gate).items()],
            params=[Param(k, str(v)[:6000]) for k, v in flat.items()],
        )
        log.info("uploaded the artifact tree in %.1fs", time.monotonic() - t0)
    except BaseException:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid, status="FINISHED")
    return rid, f"{run.info.artifact_uri}/{ARTIFACT_PATH}"


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description=AUDIT_HEADER)


def _find_or_create_version(
    client: Any, name: str, run_id: str, source: str, mlflow_run_id: str, tags: dict[str, str]
) -> tuple[Any, bool]:
    """The version tagged with this pipeline run id, or a new one (called under the registry lock)."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{RUN_ID_TAG}` = '{run_id}'")
    if found:
        mv = min(found, key=lambda v: int(v.version))
        log.info("run %s is already version %s of %r", run_id, mv.version, name)
        return mv, False
    mv = client.create_model_version(
        name, source=source, run_id=mlflow_run_id, tags=tags, description=f"pipeline run {run_id}"
    )
    deadline = time.monotonic() + 300  # a file/SQLite store is READY at once; a server may copy first
    while str(mv.status) == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(1)
        mv = client.get_model_version(name, mv.version)
    if str(mv.status) != "READY":
        raise UserError(f"models:/{name}/{mv.version}: registration ended in status {mv.status}")
    log.info("created version %s of %r from %s", mv.version, name, source)
    return mv, True


def _get_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"register.model_name={name!r}: version {version!r} does not exist") from None
        raise


def _alias(client: Any, name: str, alias: str) -> str | None:
    """The version an alias points at, or None (no such alias, or no such registered model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _move_champion(client: Any, name: str, version: str, *, actor: str, reason: str) -> None:
    """champion -> version, old champion -> previous; tags, history and audit line (under the lock)."""
    current = _alias(client, name, CHAMPION)
    if current == version:
        return
    now = _now()
    # previous first: a crash between the two leaves previous == champion, harmless.
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
        client.set_model_version_tag(name, current, f"{TAG}superseded_by", version)
        client.set_model_version_tag(name, current, f"{TAG}superseded_at", now)
    client.set_registered_model_alias(name, CHAMPION, version)
    history = _history(client, name)
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))
    for key, value in (
        ("promotion", "promoted"),
        ("promotion_reason", reason),
        ("promoted_by", actor),
        ("promoted_at", now),
        ("promoted_over", current or "none"),
    ):
        client.set_model_version_tag(name, version, f"{TAG}{key}", value)
    _audit(client, name, f"{now} promote v{version} (previous: {current or 'none'}) by {actor}: {reason}")


def _history(client: Any, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    try:
        return [str(v) for v in json.loads(raw)] if raw else []
    except (TypeError, ValueError):
        return []


def _audit(client: Any, name: str, line: str) -> None:
    """Append one line to the registered model's description (the last AUDIT_KEEP lines are kept)."""
    old = client.get_registered_model(name).description or AUDIT_HEADER
    lines = [x for x in old.splitlines() if x.startswith("- ")]
    lines = [*lines, f"- {line}"][-AUDIT_KEEP:]
    client.update_registered_model(name, description="\n".join([AUDIT_HEADER, *lines]))


@contextmanager
def _registry_lock(cfg: Config) -> Iterator[None]:
    """Serialise alias check-and-set and version creation across processes sharing this registry."""
    from filelock import FileLock, Timeout

    uri = resolve_tracking_uri(cfg.register.tracking_uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :]).with_suffix(".register.lock")
    else:  # a server registry: this only serialises one machine (see the module docstring)
        key = hashlib.sha256(uri.encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"qa-lora-register-{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{path}: registry lock still held after {LOCK_TIMEOUT_S:.0f}s by another register/promote"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
