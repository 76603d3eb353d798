"""`mlflow models serve -m models:/NAME@champion --env-manager local` serves the registered champion.

A real champion (tests/champion_fixture.py: export + register into a sqlite registry in tmp) is served on
a free loopback port. Single and batched requests (both JSON shapes) answer what the model answers
in-process; bad requests are refused with a 4xx and a message and the server keeps answering; the server's
whole process group is stopped by its id at the end and nothing of it remains.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from champion_fixture import QUESTIONS, build_champion

NEW_TOKENS = 8
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(port: int, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            return err.code, json.loads(text)
        except json.JSONDecodeError:
            return err.code, {"message": text}


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow models serve not ready after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (uvicorn and its workers), SIGKILL after 20 s."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _group_alive(pgid) and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("serve")
    champion = build_champion(root, tiny_base)
    port, log = _free_port(), root / "serve.log"
    uri = f"models:/{champion['model_name']}@champion"
    bin_dir = Path(sys.executable).parent
    # `mlflow models serve --env-manager local` runs `uvicorn` by name: the venv's bin/ must be on PATH.
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["tracking_uri"], "PATH": path}
    mlflow_cli = bin_dir / "mlflow"
    cmd = [str(mlflow_cli), "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "-p", str(port)],
            env=env,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(proc, port, log)
        yield {**champion, "port": port, "proc": proc, "log": log}
    finally:
        _stop(proc)
    assert not _group_alive(proc.pid), "a process of the server is still running after the stop"


def _expected(champion: dict[str, Any], questions: list[str]) -> list[str]:
    from tasks.plumbing.serving import Answerer

    return Answerer(champion["onnx_dir"]).answer(questions, NEW_TOKENS)


@pytest.mark.e2e
@pytest.mark.slow
def test_serve_answers_single_and_batched_requests(served: dict[str, Any]) -> None:
    port, params = served["port"], {"max_new_tokens": NEW_TOKENS}
    split = {"dataframe_split": {"columns": ["question"], "data": [[QUESTIONS[0]]]}, "params": params}
    status, body = _post(port, split)
    assert status == 200, body
    assert [row["answer"] for row in body["predictions"]] == _expected(served, QUESTIONS[:1])

    status, body = _post(port, {"inputs": {"question": QUESTIONS}, "params": params})
    assert status == 200, body
    assert [row["answer"] for row in body["predictions"]] == _expected(served, QUESTIONS)


BAD_REQUESTS = {
    "missing column": (
        {"dataframe_split": {"columns": ["query"], "data": [["What is a list?"]]}},
        "question",
    ),
    "non-string question": ({"dataframe_split": {"columns": ["question"], "data": [[42]]}}, "question"),
    "1 MB question": ({"inputs": {"question": ["x" * 1_000_000]}}, "characters"),
    "too many rows": ({"inputs": {"question": ["What is a list?"] * 17}}, "17 rows"),
    "max_new_tokens over the limit": (
        {"inputs": {"question": ["What is a list?"]}, "params": {"max_new_tokens": 100_000}},
        "max_new_tokens",
    ),
    "not JSON": (b"{not json", ""),
}


@pytest.mark.e2e
@pytest.mark.slow
def test_serve_refuses_bad_requests_and_keeps_answering(served: dict[str, Any]) -> None:
    port = served["port"]
    good = {"inputs": {"question": [QUESTIONS[2]]}, "params": {"max_new_tokens": NEW_TOKENS}}
    expected = _expected(served, QUESTIONS[2:3])
    for what, (body, named) in BAD_REQUESTS.items():
        status, reply = _post(port, body)
        assert 400 <= status < 500, f"{what}: HTTP {status} {str(reply)[:300]}"
        message = str(reply.get("message", ""))
        assert message and named in message, f"{what}: {message[:300]}"
        status, reply = _post(port, good)
        assert status == 200 and [r["answer"] for r in reply["predictions"]] == expected, what
