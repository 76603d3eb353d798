"""No orphans: a task process whose supervisor dies ends itself and everything it started (real signals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

# The "task": watches its parent, starts a stubborn "worker" (own session, ignores SIGTERM, like a
# torchrun worker mid-step), reports both PIDs, then trains forever.
TASK = """
import json, os, subprocess, sys, time
from tasks.runners.lifeline import end_with_parent
end_with_parent(poll_seconds=0.2, grace_seconds=3)
worker = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True)
print(json.dumps({"task": os.getpid(), "worker": worker.pid}), flush=True)
time.sleep(600)
"""
# The "supervisor": starts the task and waits; the test SIGKILLs it, as when a worker dies.
SUPERVISOR = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1]]).wait()"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_task_and_its_workers_end_when_the_supervisor_is_killed(repo_root) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, TASK], stdout=subprocess.PIPE, text=True, env=env
    )
    pids = json.loads(supervisor.stdout.readline())
    try:
        assert _alive(pids["task"]) and _alive(pids["worker"])
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (_alive(pids["task"]) or _alive(pids["worker"])):
            time.sleep(0.2)
        assert not _alive(pids["task"]), "the task outlived its supervisor"
        assert not _alive(pids["worker"]), "the task's worker outlived it"
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
