"""Redaction: the one place that keeps credentials out of messages, logs, reports, tags and files.

Every text the project writes where a person or another tool can read it goes through :func:`redact`
(or :func:`redact_uri` for a single URI): error lines, log records (a filter installed by
`tasks.core.logs.setup_logging`), registration.json, the model card, MLflow tags, params.effective.yaml
and XCom values. It removes
* the user-info of a URI (`scheme://user:password@host` -> `scheme://***@host`),
* secret-looking query parameters (`?token=...`, `sig=`, `X-Amz-Signature=`, ... -> `=***`),
* bearer tokens (`Authorization: Bearer ...`) and Hugging Face hub tokens (`hf_...`),
* the values of known secret environment variables wherever they appear verbatim,
* a password once seen in a URI's user-info, wherever it appears later in this process (a library may
  quote the netloc or the password alone, e.g. in a connection error).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

MASK = "***"

# scheme://user[:password]@host  -> scheme://***@host (user names can identify accounts, too). The
# user-info runs to the LAST "@" of the authority (which ends at / ? # or a space), so an unencoded
# "@" inside a password does not leave its tail behind.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s'\"<>]+)@")
_BEARER = re.compile(r"(?P<name>\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.I)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_SECRET_PARAMS = (
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "password",
    "passwd",
    "pwd",
    "secret",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "client_secret",
)
_QUERY = re.compile(
    r"(?P<name>[?&](?:" + "|".join(re.escape(p) for p in _SECRET_PARAMS) + r"))=(?P<value>[^&\s'\"#]+)", re.I
)
# Environment variables whose values are credentials (exact names, then name patterns).
SECRET_ENV_NAMES = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
)
_SECRET_ENV_PATTERN = re.compile(r"(PASSWORD|SECRET|TOKEN|PRIVATE_KEY|ACCESS_KEY)$")
_MIN_SECRET_LEN = 6  # shorter values would mask ordinary words
# Passwords seen in URI user-info during this process (see the module docstring).
_SEEN_PASSWORDS: set[str] = set()


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of credential-bearing environment variables, longest first."""
    env = os.environ if environ is None else environ
    names = {n for n in env if n in SECRET_ENV_NAMES or _SECRET_ENV_PATTERN.search(n)}
    values = {env[n] for n in names if len(env.get(n, "")) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """`text` with URI user-info, secret query values and known secret values masked."""
    if not text:
        return text
    out = _USERINFO.sub(_mask_userinfo, text)
    out = _QUERY.sub(lambda m: f"{m['name']}={MASK}", out)
    out = _BEARER.sub(lambda m: f"{m['name']}{MASK}", out)
    out = _HF_TOKEN.sub(MASK, out)
    extra = [s for s in extra_secrets if s and len(s) >= _MIN_SECRET_LEN]
    for secret in sorted({*secret_env_values(), *_SEEN_PASSWORDS, *extra}, key=len, reverse=True):
        out = out.replace(secret, MASK)
    return out


def _mask_userinfo(match: re.Match[str]) -> str:
    """Mask one URI's user-info and remember its password for later, bare occurrences."""
    _SEEN_PASSWORDS.update(_passwords(match["userinfo"]))
    return f"{match['scheme']}{MASK}@"


def _passwords(userinfo: str) -> set[str]:
    """The password of a URI's user-info, as written and percent-decoded (none when short or absent)."""
    from urllib.parse import unquote

    _, sep, password = userinfo.partition(":")
    return {password, unquote(password)} if sep and len(password) >= _MIN_SECRET_LEN else set()


def credentials_in(*texts: str) -> list[str]:
    """The credentials :func:`redact` would mask in `texts`, longest first, for a host's own masker
    (Airflow's): each URI's whole user-info (`user:password`, or a bare token) and its password (as
    written and decoded), and the values of secret environment variables."""
    found = set(secret_env_values())
    for text in texts:
        for match in _USERINFO.finditer(text or ""):
            userinfo = match["userinfo"]
            found |= _passwords(userinfo) | ({userinfo} if len(userinfo) >= _MIN_SECRET_LEN else set())
    return sorted(found, key=len, reverse=True)


def redact_uri(uri: str | None) -> str | None:
    """One URI with its credentials masked (None stays None)."""
    return None if uri is None else redact(str(uri))


def redact_obj(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings) with every string redacted; other types unchanged."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_obj(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_obj(v) for v in value)
    return value
