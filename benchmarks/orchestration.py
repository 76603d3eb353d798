"""Figure 4: orchestration overhead (the expensive figures; skip them with `--only`).

* airflow: `airflow dags test qa_lora_finetune` in a throwaway AIRFLOW_HOME, with QA_LORA_PARAMS /
  QA_LORA_RUNS_ROOT pointing at a small params overlay and a temp runs root (as tests/e2e does).
  Wall time of that command vs the sum of its stages' own times (the "stage X: done in Y s" lines
  that tasks.runners.pipeline.run_stage logs inside each task). `airflow db migrate` is timed separately.
* dvc: a temp git copy of the working tree (as tests/e2e/test_dvc_e2e.py makes one), a first full
  `dvc repro` on small settings, then `dvc repro` with nothing changed, repeated; median wall time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import QUIET_ENV, loadavg, median
from tasks.core.config import REPO_ROOT

# Small but complete: every stage runs, the gate can pass (no slice gating on a few rows).
SMALL = {
    "train": {"max_steps": 20, "save_steps": 10_000, "logging_steps": 10, "replay_ratio": 0.0},
    "eval": {"max_rows": 24, "max_new_tokens": 16, "bootstrap_samples": 200},
    "gate": {
        "min_slice_size": 1000,
        "min_improvement": -1.0,
        "max_regression": 1.0,
        "min_eos_rate": 0.0,
        "max_empty_rate": 1.0,
        "max_top_answer_share": 1.0,
        "max_general_ppl_increase": None,  # 20 steps at 2.5e-3 on the embeddings may forget; not measured here
    },
    "export": {"parity_prompts": 2, "parity_new_tokens": 4},
}
_DONE = re.compile(r"stage (\w+): done in ([0-9.]+) s")
BIN = Path(sys.executable).parent


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed (rc {proc.returncode}): {out[-3000:]}")
    return seconds, out


def _overlay(tmp: Path, small: bool = True) -> Path:
    params: dict[str, Any] = {"extends": str(REPO_ROOT / "params.yaml"), **(SMALL if small else {})}
    # cold evaluation: the checkout's score cache would let evaluate skip scoring the base model
    params["eval"] = {**params.get("eval", {}), "cache_dir": None}
    params["data"] = {"dvc_remote": str(tmp / "dvc-remote")}
    params["register"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"}
    params["runtime"] = {"run_dir": str(tmp / "runs" / "cli")}
    path = tmp / "bench-params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_airflow(tmp: Path, quick: bool) -> dict[str, Any]:
    """`airflow dags test` wall vs the sum of the stages' own times.

    The pipeline as shipped (params.yaml: the tiny base, 3 epochs, 200 eval rows), only its stores
    moved to a temp dir: Airflow's cost is mostly fixed (process start, parse, per-task bookkeeping),
    so the ratio depends on how long the stages run, and the shipped run is what users schedule.
    `--quick` uses the small settings of the dvc figure instead. The fixed part is reported in seconds.
    """
    home = tmp / "airflow-e2e"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **QUIET_ENV,
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "QA_LORA_PARAMS": str(_overlay(home, small=quick)),
        "QA_LORA_RUNS_ROOT": str(home / "runs"),
    }
    airflow = str(BIN / "airflow")
    load = loadavg()
    migrate_s, _ = _sh([airflow, "db", "migrate"], REPO_ROOT, env)
    wall, out = _sh([airflow, "dags", "test", "qa_lora_finetune"], REPO_ROOT, env, timeout=1200)
    stages: dict[str, float] = {}
    for name, seconds in _DONE.findall(out):
        stages[name] = stages.get(name, 0.0) + float(seconds)
    expected = {"validate", "version", "train", "evaluate", "export", "register"}
    missing = sorted(expected - set(stages))
    total = sum(stages.values())
    return {
        "dags_test_wall_s": round(wall, 2),
        "stage_seconds": stages,
        "stages_sum_s": round(total, 2),
        "wall_vs_stages": wall / total if total else None,
        "outside_stages_s": round(wall - total, 2),
        "missing_stage_lines": missing,
        "db_migrate_s": round(migrate_s, 2),
        "settings": SMALL if quick else "params.yaml as shipped (eval cache off)",
        "load": load,
        "load_end": loadavg(),
        "output_tail": out[-1500:] if missing else "",
    }


def run_dvc(tmp: Path, quick: bool) -> dict[str, Any]:
    """`dvc repro` with nothing changed, in a fresh git copy after one full small repro."""
    work = tmp / "dvc-bench"
    repo = work / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        src = REPO_ROOT / rel
        if src.is_file() and not rel.startswith("benchmarks/"):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    shutil.copytree(REPO_ROOT / "models" / "tiny-base", repo / "models" / "tiny-base")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    params["register"]["tracking_uri"] = f"sqlite:///{work}/mlflow.db"
    params["data"]["dvc_remote"] = str(work / "remote")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {**os.environ, **QUIET_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    _sh(["git", "init", "-q", "-b", "main"], repo, env)
    _sh([*git, "add", "-A"], repo, env)
    _sh([*git, "commit", "-qm", "bench clone"], repo, env)
    _sh(["dvc", "commit", "-f", "base"], repo, env)
    load = loadavg()
    first_s, first = _sh(["dvc", "repro"], repo, env, timeout=1200)
    ran_first = sorted(
        {line.split("'")[1] for line in first.splitlines() if line.startswith("Running stage '")}
    )
    noop = []
    ran_again: set[str] = set()
    for _ in range(3):
        seconds, out = _sh(["dvc", "repro"], repo, env)
        noop.append(seconds)
        ran_again |= {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    return {
        "first_repro_s": round(first_s, 1),
        "first_repro_ran": ran_first,
        "noop_repro_s_median": median(noop),
        "noop_repro_s_runs": [round(s, 2) for s in noop],
        "noop_ran": sorted(ran_again),
        "settings": SMALL,
        "load": load,
        "load_end": loadavg(),
    }
