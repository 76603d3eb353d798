"""`dvc repro` end to end in a fresh git checkout: full run, a no-op second run, a partial rerun.

The checkout is a copy of this working tree committed into a new git repository (what a user's
clone is), with params.yaml shrunk for speed and pointed at a temporary registry and DVC remote.
The tiny base is copied in and recorded with `dvc commit` (it is deterministic: building it again
would give the same bytes, two minutes later).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1500) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, tiny_base: Path) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("dvc-e2e")
    repo = work / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo_root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        src = repo_root / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    shutil.copytree(tiny_base, repo / "models" / "tiny-base")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(max_steps=120, save_steps=60, logging_steps=20)  # enough to pass the gate
    params["eval"].update(max_rows=60, max_new_tokens=24, bootstrap_samples=200)
    params["gate"].update(min_slice_size=1000, max_regression=1.0)  # the rerun must not be blocked by run 1
    params["export"].update(parity_prompts=3, parity_new_tokens=6)
    params["register"]["tracking_uri"] = f"sqlite:///{work}/mlflow.db"
    params["data"]["dvc_remote"] = str(work / "remote")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # qa-lora, dvc
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    _sh(["git", "init", "-q", "-b", "main"], repo, env)
    _sh([*git, "add", "-A"], repo, env)
    _sh([*git, "commit", "-qm", "fresh clone"], repo, env)
    _sh(["dvc", "commit", "-f", "base"], repo, env)  # the copied tiny base is the base stage's output
    return repo, env


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_runs_everything_then_nothing(checkout) -> None:
    repo, env = checkout
    first = _sh(["dvc", "repro"], repo, env)
    assert _ran(first) == {"validate", "version", "train", "evaluate", "export", "register"}
    assert (repo / "runs" / "dvc" / "register" / "registration.json").is_file()
    assert (repo / "dvc.lock").is_file()

    second = _sh(["dvc", "repro"], repo, env)
    assert _ran(second) == set()
    assert "up to date" in second.lower()

    metrics = _sh(["dvc", "metrics", "show"], repo, env)
    assert "token_f1" in metrics and "runs/dvc/eval/metrics.json" in metrics


def test_train_param_change_reruns_train_onwards_only(checkout) -> None:
    repo, env = checkout
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    _sh([*git, "add", "-A"], repo, env)
    _sh([*git, "commit", "-qm", "first repro"], repo, env)
    out = _sh(["dvc", "exp", "run", "-S", "train.learning_rate=0.003"], repo, env)
    ran = _ran(out)
    assert {"train", "evaluate"} <= ran
    assert "validate" not in ran and "version" not in ran
