"""A real SMTP server on loopback (aiosmtpd) that requires a login, and the Airflow connection to it:
what the notification tests send their mail to and read it back from."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import socket
from email.message import EmailMessage

LOGIN, PASSWORD = "mailer", "smtp-Secret-2718"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MailSink:
    """Start with `start()`, stop with `stop()`; `messages` and `logins` fill as mail arrives."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.logins: list[tuple[bytes, bytes]] = []
        self.port = free_port()
        self._controller = None

    def start(self) -> MailSink:
        # aiosmtpd logs every connection at INFO from its own thread, also after a test has ended and its
        # captured stream is closed ("--- Logging error ---"): its warnings are enough here.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                sink.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
                return "250 OK"

        def authenticate(server, session, envelope, mechanism, auth_data):
            sink.logins.append((auth_data.login, auth_data.password))
            return AuthResult(success=auth_data.password == PASSWORD.encode())

        self._controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticate,
            auth_require_tls=False,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()

    def connection(self, port: int | None = None) -> str:
        """AIRFLOW_CONN_<ID>'s value: this server (or another port, nobody listening), plain SMTP, a login."""
        extra = {"disable_tls": True, "disable_ssl": True, "timeout": 10, "retry_limit": 1}
        conn = {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": port or self.port,
            "login": LOGIN,
            "password": PASSWORD,
            "extra": extra,
        }
        return json.dumps(conn)


def body(message: EmailMessage) -> str:
    part = message.get_body(("html", "plain"))
    assert part is not None, message
    return part.get_content()


def readable(message: EmailMessage) -> str:
    """Headers and the decoded body (the raw message carries the body in base64)."""
    return "\n".join([*(f"{k}: {v}" for k, v in message.items()), body(message)])
