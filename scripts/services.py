"""`make airflow`: this project's Airflow services, started as one and stopped as one.

Starts the API server (UI + REST API v2), the scheduler (LocalExecutor unless the environment says
otherwise), the DAG processor and the triggerer, each as `airflow <component>` in a session of its own
with its log in `$AIRFLOW_HOME/logs/services/`. The settings are the project's: `AIRFLOW_HOME=.airflow`,
`dags/` only, no example DAGs, low parallelism, a one-slot pool for training, the venv's `bin/` on PATH.
Ctrl-C (or SIGTERM) stops every service by PID; a task whose supervisor is gone ends itself and its
training processes (tasks/runners/lifeline.py), and the stop waits for that and reports any straggler.
A straggler is a process the services started (every one carries this start's QA_LORA_SERVICES token in
its environment, inherited by whatever it spawns), never one that merely shares AIRFLOW_HOME.

Unlike `airflow standalone`, nothing is started by the bare name `airflow` from an unknown PATH and
nothing is left behind. The test fixtures use the same code (tests/e2e/test_airflow_services*.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CORE = ("api-server", "scheduler", "dag-processor", "triggerer")
SIMPLE_AUTH = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
PASSWORD_FILE = "simple_auth_manager_passwords.json.generated"
TOKEN_VAR = "QA_LORA_SERVICES"  # one token per Services object: what its processes, and theirs, inherit


def airflow_env(
    home: Path, port: int = 8080, *, parallelism: int = 4, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for every Airflow process of this project (services, CLI calls, workers)."""
    env = dict(os.environ)
    url = f"http://127.0.0.1:{port}"
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # Airflow starts some of its parts by bare name
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__PARALLELISM=str(parallelism),
        AIRFLOW__CORE__EXECUTOR=env.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor"),
        AIRFLOW__CORE__AUTH_MANAGER=SIMPLE_AUTH,
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__API__BASE_URL=url,
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{url}/execution/",
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        DVC_NO_ANALYTICS="1",
        GX_ANALYTICS_ENABLED="False",
        MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    return env


def airflow(env: Mapping[str, str], *args: str, timeout: float = 600) -> str:
    """Run one `airflow` CLI command; return its stdout, or raise with its output."""
    proc = subprocess.run(
        [str(BIN / "airflow"), *args], env=dict(env), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def prepare_home(env: Mapping[str, str], pools: Mapping[str, int]) -> None:
    """Migrate the metadata database and create (or resize) the pools."""
    airflow(env, "db", "migrate")
    for name, slots in pools.items():
        airflow(env, "pools", "set", name, str(slots), f"qa-lora: {slots} at a time", timeout=120)


class Services:
    """Airflow processes started by this object, each in its own session, stopped by PID."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.env = dict(env)
        self.log_dir = Path(log_dir)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stop_signals: dict[str, signal.Signals] = {}
        self.token = uuid.uuid4().hex

    def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `airflow <args>` (e.g. `celery worker -q mi300x`) as service `name`; `env` adds variables."""
        return self.start_command(name, [str(BIN / "airflow"), *args], env=env)

    def start_command(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> subprocess.Popen[bytes]:
        """Start any command (a database, a broker) as service `name`, stopped with `stop_signal`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stop_signals[name] = stop_signal
        with (self.log_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                env={**self.env, **(env or {}), TOKEN_VAR: self.token},
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a Ctrl-C is ours to handle, not each service's
            )
        self.procs[name] = proc
        return proc

    def start_core(self) -> None:
        """API server, scheduler, DAG processor, triggerer."""
        for component in CORE:
            self.start(component, component)

    def exited(self) -> list[str]:
        """Services that are no longer running."""
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def wait_healthy(self, timeout: float = 240) -> dict:
        """Wait until the API server answers and reports the scheduler, DAG processor and triggerer."""
        url = f"{self.env['AIRFLOW__API__BASE_URL']}/api/v2/monitor/health"
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            if dead := self.exited():
                raise RuntimeError(f"services exited: {dead}; logs in {self.log_dir}")
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    health = json.load(resp)
            except OSError:
                health = {}
            parts = [health.get(k) or {} for k in ("metadatabase", "scheduler", "triggerer", "dag_processor")]
            if health and all(p.get("status") == "healthy" for p in parts):
                return health
            time.sleep(1)
        raise TimeoutError(f"services not healthy after {timeout:.0f} s: {health}; logs in {self.log_dir}")

    def stop(self, grace: float = 20.0, orphan_wait: float = 30.0) -> list[str]:
        """Stop every service by PID (SIGTERM to its group, SIGKILL after `grace`).

        Then wait up to `orphan_wait` seconds for the processes of tasks that were running (they end
        themselves when their supervisor dies) and kill any that remain.

        Returns:
            One line for each process that had to be killed after the services were gone (expected: none).
        """
        for name, proc in self.procs.items():
            _signal_group(proc, self.stop_signals.get(name, signal.SIGTERM))
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGKILL)  # anything left in a service's own group
        return _end_stragglers(self.token, orphan_wait)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the service's PID


def processes_of(home: str) -> list:
    """Live processes (other than this one) whose environment has AIRFLOW_HOME=home (tests: nothing left)."""
    return _with_env("AIRFLOW_HOME", home)


def started_by(token: str) -> list:
    """Live processes that a Services object with this token started, directly or not."""
    return _with_env(TOKEN_VAR, token)


def _with_env(name: str, value: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get(name) == value:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _end_stragglers(token: str, wait: float) -> list[str]:
    import psutil

    deadline = time.monotonic() + wait
    while (left := started_by(token)) and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = []
    for proc in left:
        try:
            lines.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(left, timeout=10)  # gone when the stop returns, not a moment later
    return lines


def banner(env: Mapping[str, str], pool: str) -> str:
    """What a user needs after start-up: URL, credentials, logs, how to unpause and trigger, how to stop."""
    home = Path(env["AIRFLOW_HOME"])
    return f"""
Airflow is up: {env["AIRFLOW__API__BASE_URL"]}
  user:      admin
  password:  in {home / PASSWORD_FILE}
  logs:      {home / "logs"} (services: {home / "logs" / "services"})
  pool:      {pool} (1 slot: one training at a time)
The DAGs start paused. Unpause with the toggle in the UI, or:
  AIRFLOW_HOME={home} {BIN / "airflow"} dags unpause qa_lora_finetune
Unpausing runs nothing by itself: the next run is the next cron slot, a dataset update or your Trigger.
Ctrl-C stops every service and any training that is running.
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the services like Ctrl-C


def handle_stop_signals() -> None:
    """Ctrl-C and SIGTERM stop the services. Set explicitly: a shell starts a background job (`&`) with
    SIGINT ignored, and Python then installs no handler of its own, so Ctrl-C did nothing for 60 s. The
    services started after this inherit the default dispositions, not the ignore."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, default=REPO / ".airflow", help="AIRFLOW_HOME")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--parallelism", type=int, default=4, help="task slots of the executor")
    args = parser.parse_args(argv)

    from tasks.core.config import load_config
    from tasks.runners.airflow import PARAMS_FILE, TRAIN_POOL

    pool = load_config(PARAMS_FILE).orchestrate.train_pool or TRAIN_POOL
    env = airflow_env(args.home.resolve(), args.port, parallelism=args.parallelism)
    print(f"preparing {env['AIRFLOW_HOME']} (database, pool {pool}) ...", flush=True)
    prepare_home(env, {pool: 1})
    services = Services(env, args.home.resolve() / "logs" / "services")
    handle_stop_signals()
    try:
        print(f"starting {', '.join(CORE)} ...", flush=True)
        services.start_core()
        services.wait_healthy()
        print(banner(env, pool), flush=True)
        while not (dead := services.exited()):
            time.sleep(1)
        print(f"stopped by itself: {', '.join(dead)}; see {services.log_dir}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not abandon the clean-up
            signal.signal(sig, signal.SIG_IGN)
        killed = services.stop()
        print("stopped: " + ("nothing left running" if not killed else f"killed {len(killed)} stragglers"))
        for line in killed:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
