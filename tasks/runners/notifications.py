"""Who hears about a run: a failed run, a candidate the gate refused, a new champion, an approval waiting.

Every notice is logged and appended to `runs/notifications.jsonl`. The events named in
`orchestrate.notify.events` are also sent through Airflow's notifiers: by email (the SMTP provider's
`SmtpNotifier`; the server, port, TLS and login live in the Airflow connection `smtp_conn_id`, never in
params) and to a Slack incoming webhook (the Slack provider's `SlackWebhookNotifier`, the `[slack]`
extra). A channel that cannot be reached is logged as an error and recorded as undelivered; it never
fails the run it reports on. Every text passes through :func:`tasks.core.redact.redact`.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.core.errors import UserError
from tasks.core.ops_config import NotifyConfig
from tasks.core.redact import redact

log = logging.getLogger(__name__)

TITLES = {
    "failed": "run failed",
    "refused": "candidate refused",
    "champion": "new champion",
    "approval": "approval waiting",
    "succeeded": "run succeeded",  # recorded only: the events above say what a person must know
}


@dataclass(frozen=True)
class Notice:
    """One event of one run: a subject line and `key: value` lines, the same in every channel."""

    event: str
    run_id: str
    reason: str
    facts: dict[str, Any] = field(default_factory=dict)  # e.g. failed_task, report, version, run_dir

    @property
    def subject(self) -> str:
        return redact(f"[qa-lora] {TITLES[self.event]}: {self.run_id}")

    def text(self) -> str:
        lines = [f"run: {self.run_id}", f"reason: {self.reason}"]
        lines += [f"{key}: {value}" for key, value in self.facts.items() if value is not None]
        return redact("\n".join(lines))

    def record(self) -> dict[str, Any]:
        time = datetime.now(UTC).isoformat(timespec="seconds")
        facts = json.loads(redact(json.dumps(self.facts)))
        return {
            "time": time,
            "event": self.event,
            "run_id": self.run_id,
            "reason": redact(self.reason),
            **facts,
        }


def told(journal: Path, run_id: str, event: str) -> bool:
    """Whether an `event` notice for `run_id` reached someone (a journal line with a channel in `sent_to`;
    one that was only recorded, or whose channels all failed, does not count)."""
    try:
        lines = journal.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return False
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("run_id") == run_id and record.get("event") == event and record.get("sent_to"):
            return True
    return False


def deliver(
    notice: Notice, cfg: NotifyConfig, journal: Path, context: dict[str, Any] | None = None
) -> list[str]:
    """Log the notice, send it to the configured channels, append it to `journal`; the channels reached."""
    log.info("%s\n%s", notice.subject, notice.text())
    sent, failed = [], []
    for name, build in _channels(cfg) if notice.event in cfg.events else []:
        try:
            build(notice, cfg).notify(context or {})
            sent.append(name)
        except Exception as exc:  # a notice that cannot be sent must not fail the run it reports on
            log.error("notice %r not sent to %s: %s", notice.subject, name, redact(str(exc)))
            failed.append(name)
    journal.parent.mkdir(parents=True, exist_ok=True)
    with journal.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({**notice.record(), "sent_to": sent, "not_sent_to": failed}) + "\n")
    return sent


def _channels(cfg: NotifyConfig) -> list[tuple[str, Callable[[Notice, NotifyConfig], Any]]]:
    """(channel name, notifier builder) for each channel configured."""
    out: list[tuple[str, Callable[[Notice, NotifyConfig], Any]]] = []
    if cfg.email_to:
        out.append((f"email:{','.join(cfg.email_to)}", _email))
    if cfg.slack_webhook_conn_id:
        out.append((f"slack:{cfg.slack_webhook_conn_id}", _slack))
    return out


def _email(notice: Notice, cfg: NotifyConfig) -> Any:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    return SmtpNotifier(
        to=list(cfg.email_to),
        from_email=cfg.email_from,
        subject=notice.subject,
        html_content=f"<pre>{html.escape(notice.text())}</pre>",
        smtp_conn_id=cfg.smtp_conn_id,
    )


def _slack(notice: Notice, cfg: NotifyConfig) -> Any:
    try:
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier
    except ImportError:
        raise UserError(
            "orchestrate.notify.slack_webhook_conn_id is set but the Slack provider is missing: "
            "pip install -e '.[slack]'"
        ) from None
    text = f"*{notice.subject}*\n{notice.text()}"
    return SlackWebhookNotifier(slack_webhook_conn_id=cfg.slack_webhook_conn_id, text=text)
