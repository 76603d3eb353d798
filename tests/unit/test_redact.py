"""Redaction: the one helper, and the places that must use it (log records, the CLI's error line, the
params snapshot). Secrets here are made-up values; each assertion names the exact masked form."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import yaml

from tasks.core.config import load_config, save_config
from tasks.core.logs import adopt_library_loggers, setup_logging
from tasks.core.redact import MASK, redact, redact_obj, redact_uri
from tasks.runners.cli import main

PASSWORD = "S3cr3tPW-unit-3f9a"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"http://alice:{PASSWORD}@127.0.0.1:9/", "http://***@127.0.0.1:9/"),
        ("https://token-only@host.example/x", "https://***@host.example/x"),
        # an unencoded "@" inside the password must not leave its tail behind
        ("postgresql://u:p@ss@word-1@db:5432/x", "postgresql://***@db:5432/x"),
        ("s3://bucket/key?X-Amz-Signature=abcdef123&x=1", "s3://bucket/key?X-Amz-Signature=***&x=1"),
        ("https://h/x?token=hf_abc&sig=zz9&keep=yes", "https://h/x?token=***&sig=***&keep=yes"),
        ("Authorization: Bearer abc.DEF-123_456", "Authorization: Bearer ***"),
        ("token hf_AbCdEfGhIjKlMnOpQrStUvWx0123 used", "token *** used"),
        # nothing to mask: plain URIs, e-mail addresses, paths with "@"
        ("sqlite:///runs/mlflow.db and s3://bucket/dvc", "sqlite:///runs/mlflow.db and s3://bucket/dvc"),
        ("mail qa@example.com, see http://host/a@b", "mail qa@example.com, see http://host/a@b"),
    ],
)
def test_redact_masks_credentials_and_nothing_else(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_secret_env_values_and_remembered_passwords_are_masked_anywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", "planted-hub-token-77")
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "planted-service-pw-88")
    assert redact("a planted-hub-token-77 b planted-service-pw-88") == f"a {MASK} b {MASK}"
    # a password seen once in a URI is masked when a library later quotes it alone
    redact("http://carol:Remembered-Pw-2c4e@host/")
    assert redact("auth failed for password Remembered-Pw-2c4e") == f"auth failed for password {MASK}"
    assert redact_uri(None) is None
    assert redact_obj({"a": [f"http://u:{PASSWORD}@h/"], "n": 3}) == {"a": ["http://***@h/"], "n": 3}


def test_every_log_record_is_redacted_message_arguments_and_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import dvc.logger

    setup_logging("INFO")
    dvc.logger.setup()  # what `import dvc` does: console handlers on its loggers, bound to this stderr
    adopt_library_loggers("dvc", "dvc_objects", "dvc_data")  # what the version stage does after it
    try:
        logging.getLogger("qa_lora.test").info("store %s unavailable", f"http://alice:{PASSWORD}@h:9/")
        logging.getLogger("some.library").warning(f"plain message with ?token={PASSWORD}")
        try:
            raise ConnectionError(f"cannot reach http://alice:{PASSWORD}@h:9/")
        except ConnectionError:
            logging.getLogger("dvc_data.hashfile.transfer").exception("failed to transfer 'x'")
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert PASSWORD not in err
    assert "qa_lora.test: store http://***@h:9/ unavailable" in err
    assert "plain message with ?token=***" in err
    assert "ConnectionError: cannot reach http://***@h:9/" in err  # the traceback is kept, masked
    assert "ERROR: failed" not in err  # DVC's own console line: one line per record, ours


def test_a_library_handler_outside_the_root_logger_sees_the_record_redacted() -> None:
    """A handler on a library's own logger writes before the root's: the record is redacted when made."""
    setup_logging("INFO")
    stream = io.StringIO()
    own = logging.getLogger("some.library.with.its.own.handler")
    own.addHandler(handler := logging.StreamHandler(stream))
    own.propagate = False
    try:
        own.warning("pushing to %s", f"https://bob:{PASSWORD}@remote.example/dvc")
    finally:
        own.removeHandler(handler)
        logging.getLogger().handlers.clear()
    assert stream.getvalue() == "pushing to https://***@remote.example/dvc\n"


def test_cli_error_line_masks_the_tracking_uri(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"ftp://alice:{PASSWORD}@mlflow.example/"  # refused by `run` before anything is written
    assert main(["run", "--run-dir", str(tmp_path / "run"), "--set", f"register.tracking_uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert PASSWORD not in err
    assert err.startswith("qa-lora: error: register.tracking_uri") and "ftp://***@mlflow.example/" in err


def test_params_snapshot_masks_credentialed_uris(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            f"register.tracking_uri=http://alice:{PASSWORD}@127.0.0.1:5000/",
            f"data.dvc_remote=https://bob:{PASSWORD}@dvc.example/remote",
        ]
    )
    path = save_config(cfg, tmp_path / "params.effective.yaml")
    text = path.read_text()
    assert PASSWORD not in text
    saved = yaml.safe_load(text)
    assert saved["register"]["tracking_uri"] == "http://***@127.0.0.1:5000/"
    assert saved["data"]["dvc_remote"] == "https://***@dvc.example/remote"
