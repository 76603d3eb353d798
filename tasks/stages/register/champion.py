"""Moving the champion alias: promotion (check-and-set), rollback, and the audit trail of both.

* Aliases: `candidate` = the newest registered version; `champion` moves only when the gate passed and
  promotion is on (register.promote, no pending approval); the champion it replaces becomes `previous`.
* Check-and-set: the gate compared the candidate against one champion (gate.json `champion_version`).
  MLflow has no conditional alias update, so reading the champion and moving it happen under a file
  lock (beside the SQLite database; keyed by the registry URI in the temp dir for a server registry,
  which then only serialises one machine: give the DAG's register task a one-slot pool there).
* Audit: every alias move tags the versions involved (who, when, why) and appends a line to the
  registered model's description; `qa_lora.champion_history` (a registered-model tag) is the stack
  that `rollback` pops. Reasons and actors are redacted before they are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.core.redact import redact
from tasks.plumbing.registry import CHAMPION, LOCK_TIMEOUT_S, PREVIOUS, TAG, alias_version
from tasks.plumbing.sqlite_store import sqlite_path
from tasks.plumbing.tracking import resolve_tracking_uri, setup_mlflow
from tasks.stages.register.lineage import norm_version
from tasks.stages.register.upload import get_version

log = logging.getLogger("qa_lora.register")

HISTORY_TAG = f"{TAG}champion_history"
AUDIT_HEADER = "qa-lora model registry entry. Champion audit log (newest last):"
AUDIT_KEEP = 50  # audit lines kept in the description; version tags keep each event for good
HISTORY_KEEP = 100


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
    with registry_lock(cfg):
        mv = get_version(client, name, version)
        current = alias_version(client, name, CHAMPION)
        expected = norm_version(mv.tags.get(f"{TAG}gate.champion_version"))
        if current == version:
            promoted, why = True, "already the champion"
        elif if_champion_unchanged and current != expected:
            promoted, why = False, stale_gate_reason(expected, current)
            mark_not_promoted(client, name, version, "refused", why)
        else:
            move_champion(client, name, version, actor=actor, reason=reason)
            promoted, why = True, reason
        result = {
            "model_name": name,
            "version": version,
            "promoted": promoted,
            "reason": redact(why),
            "champion": alias_version(client, name, CHAMPION),
            "previous": alias_version(client, name, PREVIOUS),
        }
    log.info("promote %r v%s by %s: %s", name, version, actor, "done" if promoted else why)
    return result


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
    with registry_lock(cfg):
        current, target = _rollback_pair(client, name)
        history = _history(client, name)
        while history and history[-1] == current:
            history.pop()
        if not history or history[-1] != target:
            history.append(target)
        new_previous = next((v for v in reversed(history[:-1]) if v != target), None)
        # Order: champion first, then previous; a crash in between leaves previous == champion, which
        # a second rollback refuses instead of bouncing between two versions.
        client.set_registered_model_alias(name, CHAMPION, target)
        if new_previous is None:
            client.delete_registered_model_alias(name, PREVIOUS)
        else:
            client.set_registered_model_alias(name, PREVIOUS, new_previous)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))
        now = _now()
        _tag(client, name, current, rolled_back_by=actor, rolled_back_at=now, rollback_reason=reason)
        _tag(client, name, target, restored_by=actor, restored_at=now, restore_reason=reason)
        audit(client, name, f"{now} rollback v{current} -> v{target} by {actor}: {reason}")
    log.info("rollback %r: champion v%s -> v%s by %s (%s)", name, current, target, actor, reason)
    return {
        "model_name": name,
        "champion": target,
        "rolled_back": current,
        "previous": new_previous,
        "reason": redact(reason),
        "actor": redact(actor),
    }


def _rollback_pair(client: Any, name: str) -> tuple[str, str]:
    """(current champion, previous champion), or a UserError saying why there is nothing to go back to."""
    current = alias_version(client, name, CHAMPION)
    target = alias_version(client, name, PREVIOUS)
    if current is None:
        raise UserError(f"register.model_name={name!r}: no champion to roll back (nothing was promoted)")
    if target is None or target == current:
        raise UserError(
            f"register.model_name={name!r}: champion is v{current} and there is no previous champion "
            "to roll back to (use `qa-lora promote VERSION`)"
        )
    return current, target


def stale_gate_reason(expected: str | None, current: str | None) -> str:
    """Why a candidate is not promoted: the champion moved since its gate compared against one."""
    return (
        f"champion changed since the gate ran: the gate compared against {expected or 'no champion'}, "
        f"the champion is now {current or 'unset'}; not promoted over it"
    )


def mark_not_promoted(client: Any, name: str, version: str, status: str, reason: str) -> None:
    """Tag a version with why it did not become champion (pending, refused, skipped)."""
    _tag(client, name, version, promotion=status, promotion_reason=reason)


def move_champion(client: Any, name: str, version: str, *, actor: str, reason: str) -> None:
    """champion -> version, old champion -> previous; tags, history and audit line (under the lock)."""
    current = alias_version(client, name, CHAMPION)
    if current == version:
        return
    now = _now()
    # previous first: a crash between the two leaves previous == champion, harmless.
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
        _tag(client, name, current, superseded_by=version, superseded_at=now)
    client.set_registered_model_alias(name, CHAMPION, version)
    history = _history(client, name)
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))
    _tag(
        client,
        name,
        version,
        promotion="promoted",
        promotion_reason=reason,
        promoted_by=actor,
        promoted_at=now,
        promoted_over=current or "none",
    )
    audit(client, name, f"{now} promote v{version} (previous: {current or 'none'}) by {actor}: {reason}")


def _tag(client: Any, name: str, version: str, **tags: str) -> None:
    """Set `qa_lora.<key>` tags on a version, credentials redacted (reasons are free text)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"{TAG}{key}", redact(str(value)))


def _history(client: Any, name: str) -> list[str]:
    """The champion stack (oldest first); a malformed tag is named, never read as an empty history."""
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    if not raw:
        return []
    try:
        history = json.loads(raw)
    except ValueError:
        history = None
    if not isinstance(history, list):
        raise UserError(
            f"registered model {name!r}: tag {HISTORY_TAG} is not a JSON list of versions ({raw[:80]!r}); "
            "fix or delete the tag, then retry"
        )
    return [str(v) for v in history]


def audit(client: Any, name: str, line: str) -> None:
    """Append one line to the registered model's description (the last AUDIT_KEEP lines are kept)."""
    old = client.get_registered_model(name).description or AUDIT_HEADER
    lines = [x for x in old.splitlines() if x.startswith("- ")]
    lines = [*lines, f"- {redact(line)}"][-AUDIT_KEEP:]
    client.update_registered_model(name, description="\n".join([AUDIT_HEADER, *lines]))


@contextmanager
def registry_lock(cfg: Config) -> Iterator[None]:
    """Serialise alias check-and-set and version creation across processes sharing this registry.

    Raises:
        UserError: the lock is still held by another register/promote after LOCK_TIMEOUT_S.
    """
    from filelock import FileLock, Timeout

    uri = resolve_tracking_uri(cfg.register.tracking_uri)
    if (db := sqlite_path(uri)) is not None:
        path = db.with_suffix(".register.lock")
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
