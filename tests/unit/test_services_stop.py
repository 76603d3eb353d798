"""`make airflow`'s stop ends only what its services started (scripts/services.py), and a start in the
background (`&`, SIGINT ignored) still stops on Ctrl-C. No Airflow here: the services are stand-ins that
behave like a task with a training worker in a session of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from scripts.services import Services

# A service that starts a "training worker" in a session of its own (as torchrun's workers are), writes
# the worker's PID, and waits. The worker ignores SIGTERM: it is the straggler the stop must still end.
SERVICE = """
import subprocess, sys, time
worker = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
    start_new_session=True,
)
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_ends_what_the_services_started_and_nothing_else(tmp_path: Path) -> None:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "home")}
    services = Services(env, tmp_path / "logs")
    pid_file = tmp_path / "worker.pid"
    services.start_command("task", [sys.executable, "-c", SERVICE, str(pid_file)])
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the stand-in service did not start its worker"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        killed = services.stop(grace=5, orphan_wait=1)
        assert _gone(worker) and [line for line in killed if line.startswith(f"pid {worker}:")]
        assert unrelated.poll() is None, "a process that only shares AIRFLOW_HOME was stopped"
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_background_start_stops_on_ctrl_c(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from scripts.services import handle_stop_signals\n"
        "handle_stop_signals()\n"
        "try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n    print('stopping', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # what `&` in a script does
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert out.strip() == "stopping" and proc.returncode == 0, err
