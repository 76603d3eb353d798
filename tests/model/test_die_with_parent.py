"""A child started with die_with_parent ends when its parent is SIGKILLed (real processes, real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")

PARENT = """
import subprocess, sys
from tasks.stages.train.distributed import die_with_parent
preexec = die_with_parent if sys.argv[1] == "on" else None
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=preexec)
print(child.pid, flush=True)
child.wait()
"""


def _child_after_parent_killed(mode: str) -> psutil.Process | None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
            return None
        time.sleep(0.1)
    return psutil.Process(child_pid)


def test_torchrun_child_ends_when_the_task_process_is_killed() -> None:
    assert _child_after_parent_killed("on") is None


def test_without_it_the_child_is_orphaned() -> None:
    # The control: the same child without the death signal outlives its parent (what #14 found).
    orphan = _child_after_parent_killed_briefly()
    try:
        assert orphan is not None and orphan.is_running()
    finally:
        if orphan is not None:
            orphan.kill()


def _child_after_parent_killed_briefly() -> psutil.Process | None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "off"], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    time.sleep(2)
    return psutil.Process(child_pid) if psutil.pid_exists(child_pid) else None
