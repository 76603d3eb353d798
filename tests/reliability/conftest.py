"""Fixtures for the reliability suite: an isolated home (tiny params overlay, data, registry, DVC remote),
a planted-secrets environment, and `qa-lora` subprocess helpers whose logs are kept for the secret scan.

Stages run as real `qa-lora` processes (the console script of this venv), so a kill -9 is a real kill
and exit codes / stderr are what a user or an Airflow task log sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from loopback_s3 import LoopbackS3
from small_lora import SMALL_LORA

REPO = Path(__file__).resolve().parents[2]
QA_LORA = str(Path(sys.executable).with_name("qa-lora"))

# Unique values planted in the environment of every subprocess; none may appear in any output.
SECRETS = {
    "HF_TOKEN": "hf_reliabilitySecretToken7f3a9c1e",
    "HUGGING_FACE_HUB_TOKEN": "hf_reliabilityHubToken2b8d4e6f",
    "MLFLOW_TRACKING_USERNAME": "qa-lora-ci",
    "MLFLOW_TRACKING_PASSWORD": "mlflowPw-reliability-5c7e9a1b",
    "AIRFLOW_CONN_QA_LORA_MLFLOW": "http://qa-lora-ci:airflowConnPw-reliability-3d5f7b9c@mlflow.invalid:5000",
}
SECRET_VALUES = (
    "hf_reliabilitySecretToken7f3a9c1e",
    "hf_reliabilityHubToken2b8d4e6f",
    "mlflowPw-reliability-5c7e9a1b",
    "airflowConnPw-reliability-3d5f7b9c",
)

# Small but real: a 20-step training with checkpoints every 5 steps, an 8-row eval, short parity checks.
# The gate is opened wide (the suite tests faults, not model quality), so export and register run.
PARAMS = """\
extends: {repo}/params.yaml
data:
  source: {home}/data/qa.jsonl
  allowed_roots: [{home}/data]
  min_rows: 50
  eval_fraction: 0.1
  dvc_remote: {home}/dvc-remote
base:
  kind: hub
  name_or_path: {base}
lora: {lora}  # tests/small_lora.py: the short-run adapter
train:
  max_steps: 20
  save_steps: 5          # the checkpoint interval: the most work a kill -9 may lose
  save_total_limit: 10   # keep the resumed-from checkpoint (see test_resume_survives_checkpoint_rotation)
  logging_steps: 1       # one log line per step: the log tells how far training got before a kill
  per_device_train_batch_size: 8
  max_length: 128
  warmup_ratio: 0.0
  replay_ratio: 0.0      # tests/small_lora.py: short runs train without replay
eval:
  max_rows: 8
  max_new_tokens: 8
  batch_size: 8
  bootstrap_samples: 100
  cache_dir: {home}/eval-cache
gate:
  min_improvement: -1.0
  max_regression: 1.0
  min_eos_rate: 0.0
  max_empty_rate: 1.0
  max_top_answer_share: 1.0
  min_slice_size: 1000
  max_latency_regression: 10.0
  max_size_regression: 10.0
  max_general_ppl_increase: null
export:
  parity_prompts: 2
  parity_new_tokens: 4
register:
  tracking_uri: sqlite:///{home}/mlflow.db
runtime:
  run_dir: {home}/runs/default
  num_threads: 2
"""
DATA_ROWS = 180


def secret_env(home: Path) -> dict[str, str]:
    """The environment of every stage process: offline, quiet, and with the planted secrets."""
    env = dict(os.environ)
    env.update(SECRETS)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(home / "hf-modules"),
        PYTHONPATH=str(REPO),
        # a closed port must fail in seconds, not after MLflow's default 7 retries with backoff
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
    )
    return env


class Home:
    """One isolated place for a scenario: params overlay, data, registry, remote, runs, logs."""

    def __init__(self, root: Path, base: Path) -> None:
        self.root = root
        self.params = root / "params.yaml"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        self.params.write_text(
            PARAMS.format(repo=REPO, home=root, base=base, lora=json.dumps(SMALL_LORA)), encoding="utf-8"
        )
        self.env = secret_env(root)
        self._n = 0

    def log_path(self, label: str) -> Path:
        self._n += 1
        return self.logs / f"{self._n:02d}-{label}.log"

    def args(self, command: str, run_dir: Path | None, sets: Sequence[str]) -> list[str]:
        out = [QA_LORA, command, "--params", str(self.params)]
        if run_dir is not None:
            out += ["--run-dir", str(run_dir)]
        for item in sets:
            out += ["--set", item]
        return out

    def run(
        self,
        command: str,
        run_dir: Path | None = None,
        *sets: str,
        timeout: int = 600,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`qa-lora COMMAND` to completion (`env`: variables added to the home's); stdout+stderr also
        kept under logs/ for the secret scan."""
        done = subprocess.run(
            self.args(command, run_dir, sets),
            cwd=REPO,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        self.log_path(command).write_text(done.stdout + "\n" + done.stderr, encoding="utf-8")
        return done

    def start(self, command: str, run_dir: Path, *sets: str) -> tuple[subprocess.Popen[bytes], Path]:
        """`qa-lora COMMAND` in the background, output to a log file (polled by the caller)."""
        log = self.log_path(command)
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                self.args(command, run_dir, sets), cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT
            )
        return proc, log

    def python(self, code: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        """A Python snippet in a fresh process with the stage environment (output kept for the scan)."""
        done = subprocess.run(
            [sys.executable, "-c", code, *argv],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        self.log_path("python").write_text(done.stdout + "\n" + done.stderr, encoding="utf-8")
        return done


def write_dataset(path: Path, n: int = DATA_ROWS) -> Path:
    """n rows spread over the bundled dataset (or synthetic rows where it is absent)."""
    source = REPO / "data" / "qa.jsonl"
    if source.is_file():
        rows = [json.loads(x) for x in source.read_text(encoding="utf-8").splitlines() if x.strip()]
        rows = rows[:: max(1, len(rows) // n)][:n]
    else:
        rows = [
            {
                "id": f"s{i}",
                "question": f"What does function number {i} in module m{i % 7} return?",
                "answer": f"It returns the value {i * 3} as an integer.",
                "category": f"m{i % 7}",
            }
            for i in range(n)
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def wait_for(predicate: Callable[[], Any], proc: subprocess.Popen[Any], timeout: float, what: str) -> Any:
    """Poll until predicate() is truthy; fail if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def last_json(stdout: str) -> dict[str, Any]:
    """The JSON result a `qa-lora` stage prints on stdout."""
    start = stdout.find("{")
    assert start >= 0, stdout[-2000:]
    return json.loads(stdout[start:])


S3_BUCKET = "qa-lora-reliability"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackS3]:
    """A real S3-compatible server on loopback (moto, server mode, signatures checked), one bucket."""
    server = LoopbackS3(tmp_path_factory.mktemp("moto") / "moto.log")
    server.create_bucket(S3_BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def make_home(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Callable[[str], Home]:
    """make_home(name) -> a fresh Home with the tiny dataset written."""

    def make(name: str) -> Home:
        home = Home(tmp_path_factory.mktemp(name), tiny_base)
        write_dataset(home.root / "data" / "qa.jsonl")
        return home

    return make


# ------------------------------------------------------------------------------------------ the journey

STEP_RE = r"qa_lora\.train: step (\d+)/(\d+)"

# Kills a `qa-lora register` process (SIGKILL: no cleanup runs) at a chosen point inside the stage:
# "upload": after the adapter was uploaded and before the merged model is; "version": right after the
# registry created the version, before any alias moved or registration.json was written (lock held).
REGISTER_KILLER = """\
import os, signal, sys
from mlflow import MlflowClient
point = sys.argv[1]
if point == "upload":
    original, calls = MlflowClient.log_artifacts, []
    def log_artifacts(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    MlflowClient.log_artifacts = log_artifacts
else:
    original = MlflowClient.create_model_version
    def create_model_version(self, *args, **kwargs):
        original(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    MlflowClient.create_model_version = create_model_version
from tasks.runners.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _complete_checkpoints(ckpt_dir: Path) -> list[int]:
    """Checkpoint steps whose trainer_state.json (written last by the Trainer) is there."""
    steps = []
    for path in ckpt_dir.glob("checkpoint-*"):
        if (path / "trainer_state.json").is_file():
            steps.append(int(path.name.split("-")[1]))
    return sorted(steps)


def _steps_logged(log: Path) -> list[int]:
    import re

    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return [int(m.group(1)) for m in re.finditer(STEP_RE, text)]


@pytest.fixture(scope="session")
def journey(make_home: Callable[[str], Home]) -> dict[str, Any]:
    """One run through every stage as `qa-lora` processes, with faults injected on the way.

    validate -> version -> train (kill -9 after a checkpoint, then resume) -> evaluate -> export (kill -9
    while the temporary export is being written, then again) -> register (kill -9 during the upload,
    kill -9 right after the version was created, then again). Observations go in the returned dict;
    the tests assert on them. Every process runs with planted secrets (see SECRETS).
    """
    import signal

    home = make_home("journey")
    run = home.root / "runs" / "r1"
    obs: dict[str, Any] = {"home": home, "run": run}
    for stage in ("validate", "version"):
        done = home.run(stage, run)
        assert done.returncode == 0, done.stderr[-3000:]
    # params snapshot, as the pipeline runner and the DAG write it
    done = home.python(
        "import sys; from pathlib import Path; from tasks.core.config import load_config;"
        "from tasks.runners.pipeline import prepare_run;"
        "prepare_run(load_config(sys.argv[1]), Path(sys.argv[2]))",
        str(home.params),
        str(run),
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # ---- train: kill -9 two steps after the first checkpoint, then run again
    save_steps = 5
    ckpt_dir = run / "train" / "checkpoints"
    proc, log = home.start("train", run)
    adapter_seen = False

    def past_checkpoint() -> bool:
        nonlocal adapter_seen
        adapter_seen |= (run / "train" / "adapter").exists()
        steps = _steps_logged(log)
        return bool(_complete_checkpoints(ckpt_dir)) and bool(steps) and max(steps) >= save_steps + 2

    wait_for(past_checkpoint, proc, 900, "a complete checkpoint and two more steps")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    obs["train_kill"] = {
        "returncode": proc.returncode,
        "steps_logged": _steps_logged(log),
        "complete_checkpoints": _complete_checkpoints(ckpt_dir),
        "adapter_seen_while_running": adapter_seen,
        "adapter_after_kill": (run / "train" / "adapter").exists(),
        "summary_after_kill": (run / "train" / "train_summary.json").exists(),
    }
    done = home.run("train", run)
    assert done.returncode == 0, done.stderr[-3000:]
    obs["train_resume"] = last_json(done.stdout)
    obs["train_resume_log"] = done.stderr

    for stage in ("evaluate",):
        done = home.run(stage, run)
        assert done.returncode == 0, done.stderr[-3000:]

    # ---- export: kill -9 once the merged weights are in the temporary export, then run again
    proc, log = home.start("export", run)
    tmp_export = run / ".tmp-export"
    export_seen = False

    def export_in_progress() -> bool:
        nonlocal export_seen
        export_seen |= (run / "export").exists()
        return (tmp_export / "merged" / "model.safetensors").is_file()

    wait_for(export_in_progress, proc, 900, "the merged weights in .tmp-export")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    obs["export_kill"] = {
        "returncode": proc.returncode,
        "export_seen_while_running": export_seen,
        "export_after_kill": (run / "export").exists(),
        "tmp_after_kill": tmp_export.exists(),
    }
    refused = home.run("register", run)
    obs["register_after_export_kill"] = refused
    obs["versions_after_export_kill"] = registry_versions(home)
    done = home.run("export", run)
    assert done.returncode == 0, done.stderr[-3000:]
    obs["export_rerun"] = last_json(done.stdout)
    obs["tmp_after_rerun"] = tmp_export.exists()

    # ---- register: kill -9 during the upload, then right after the version was created, then finish
    kills = {}
    for point in ("upload", "version"):
        done = home.python(
            REGISTER_KILLER, point, "register", "--params", str(home.params), "--run-dir", str(run)
        )
        kills[point] = {
            "returncode": done.returncode,
            "stderr": done.stderr[-2000:],
            "versions": registry_versions(home),
            "registration_json": (run / "register" / "registration.json").exists(),
        }
    obs["register_kills"] = kills
    done = home.run("register", run)
    assert done.returncode == 0, done.stderr[-3000:]
    obs["register_rerun"] = last_json(done.stdout)
    obs["versions_final"] = registry_versions(home)
    return obs


def registry_versions(home: Home, tracking_uri: str | None = None) -> dict[str, Any]:
    """Every version of the model in the home's registry: source path, run status, aliases (a subprocess,
    so this test process never holds MLflow's global tracking state). A registry that cannot be read
    fails the caller; only a model that was never registered reads as "no versions"."""
    code = """\
import json, sys
from pathlib import Path
from tasks.core.config import load_config
from tasks.plumbing.tracking import setup_mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
cfg = load_config(sys.argv[1], [f"register.tracking_uri={sys.argv[2]}"] if len(sys.argv) > 2 else [])
setup_mlflow(cfg)
client, name = MlflowClient(), cfg.register.model_name
out = {"versions": [], "aliases": {}}
out["runs"] = [
    {"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags)}
    for r in client.search_runs([client.get_experiment_by_name(cfg.register.experiment).experiment_id])
]
try:
    model = client.get_registered_model(name)
except MlflowException as exc:  # only "no such model" means no versions; anything else is a failure
    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
        raise
    print(json.dumps(out)); sys.exit(0)
out["aliases"] = {k: str(v) for k, v in dict(model.aliases).items()}
for mv in client.search_model_versions(f"name = '{name}'"):
    run = client.get_run(mv.run_id)
    out["versions"].append({"version": str(mv.version), "source": mv.source, "status": str(mv.status),
        "run_status": run.info.status, "aliases": list(mv.aliases), "tags": dict(mv.tags)})
print(json.dumps(out))
"""
    done = home.python(code, str(home.params), *([tracking_uri] if tracking_uri else []))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
