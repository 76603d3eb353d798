"""A task process ends itself, and every process it started, when the process that supervises it dies.

Airflow runs each task in a process of its own (and its own process group) under a supervisor: the
LocalExecutor's worker, a Celery worker's pool process. The supervisor kills that group on "mark failed"
or an execution timeout, but when the supervisor itself dies (the services are stopped, the worker is
killed) nobody is left to do it, and a training run (or torchrun and its workers, which start their own
sessions) would keep the CPU or GPU busy as orphans. A daemon thread watches the parent PID; when the
process is re-parented it ends the whole tree below it, then itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

log = logging.getLogger("qa_lora.dag")

_started: set[int] = set()  # PIDs that already watch their parent (a forked child must start its own)


def end_with_parent(poll_seconds: float = 1.0, grace_seconds: float = 10.0) -> None:
    """Watch this process's parent; when it dies, end our descendants and this process.

    Idempotent per process. Descendants get SIGTERM (torchrun stops its workers on it), then SIGKILL
    after `grace_seconds`; this process exits with status 143 (as if terminated).

    Args:
        poll_seconds: how often the parent PID is checked.
        grace_seconds: how long descendants get to end after SIGTERM.
    """
    pid = os.getpid()
    if pid in _started:
        return
    _started.add(pid)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        log.error("the task's supervisor (pid %d) is gone: ending this task and its processes", parent)
        end_descendants(grace_seconds)
        os._exit(143)

    threading.Thread(target=watch, name="qa-lora-lifeline", daemon=True).start()


def end_descendants(grace_seconds: float = 10.0) -> int:
    """SIGTERM every descendant of this process, SIGKILL those still alive after the grace; return count."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_seconds)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=grace_seconds)
    return len(children)
