"""The DVC cache and remote survive kill -9 of `qa-lora version` mid-push (issue #19, item 4).

A real `qa-lora version` process versions a ~160 MB split into a throwaway DVC repository (QA_LORA_ROOT)
and a local directory remote (`--set data.dvc_remote=...`). One clean run is timed first, watching the
remote from outside to see when the push starts; then, each time from an empty cache and remote, the
process is killed with SIGKILL at five delays spread over the push (counted from the moment its first
file reaches the remote), and once more the moment the remote holds a partial object (a DVC `*.tmp`
file). After every kill the next `qa-lora version` completes with
the same dataset hash, `dvc status -c` semantics (dvc_data's compare_status, cache against remote) find
every object on the remote, every file named as an object in the cache or the remote holds exactly the
bytes its name is the md5 of (a leftover partial file may only carry DVC's temporary `.tmp` name), and
the version comes back byte for byte through the stage's public `fetch_dataset` into an empty clone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
QA_LORA = str(Path(sys.executable).with_name("qa-lora"))
REMOTE_NAME = "qa_lora"  # the remote the stage configures from data.dvc_remote
TRAIN_ROWS = 1_000_000  # ~160 MB: copying it to the remote takes long enough to be hit by a kill
OBJECT_RE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{30}(\.dir)?$")
PUSH_FRACTIONS = (0.0, 0.1, 0.2, 0.35, 0.6)  # kill delays, as fractions of the measured push window


@dataclass
class DvcHome:
    """A throwaway DVC project, its local remote, and a run dir holding a validated-format split."""

    root: Path
    origin: Path = field(init=False)
    remote: Path = field(init=False)
    run: Path = field(init=False)
    params: Path = field(init=False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        from dvc.repo import Repo

        self.origin, self.remote, self.run = self.root / "origin", self.root / "remote", self.root / "run"
        self.origin.mkdir()
        subprocess.run(["git", "init", "-q", str(self.origin)], check=True)
        Repo.init(str(self.origin)).close()
        self.params = self.root / "params.yaml"
        self.params.write_text(f"extends: {REPO}/params.yaml\n", encoding="utf-8")
        # the stage versions into the project at QA_LORA_ROOT (its .dvc/cache), never this checkout's
        self.env = {**os.environ, "QA_LORA_ROOT": str(self.origin), "PYTHONPATH": str(REPO)}
        self.env.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

    @property
    def cache(self) -> Path:
        return self.origin / ".dvc" / "cache"

    def args(self) -> list[str]:
        return [
            QA_LORA, "version", "--params", str(self.params), "--run-dir", str(self.run),
            "--set", f"data.dvc_remote={self.remote}",
        ]  # fmt: skip

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.args(),
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def version(self) -> dict[str, Any]:
        """`qa-lora version` to completion; its printed result (fails the test on a non-zero exit)."""
        done = subprocess.run(
            self.args(), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout[done.stdout.find("{") :])

    def reset_stores(self) -> None:
        """An empty cache and remote and no version.json: every kill starts from nothing pushed."""
        shutil.rmtree(self.cache, ignore_errors=True)
        shutil.rmtree(self.remote, ignore_errors=True)
        (self.run / "version.json").unlink(missing_ok=True)


def _write_split(data: Path, rows: int) -> None:
    """A split in the validated format (id, question, answer, category), large enough to push slowly."""
    data.mkdir(parents=True)
    with (data / "train.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(
            f'{{"id": "s{i}", "question": "What does function number {i} in module m{i % 7} return?", '
            f'"answer": "It returns the value {i * 3} as an integer.", "category": "m{i % 7}"}}\n'
            for i in range(rows)
        )
    (data / "eval.jsonl").write_text(
        '{"id": "e1", "question": "What does m1 return?", "answer": "An integer.", "category": "m1"}\n',
        encoding="utf-8",
    )


@pytest.fixture
def dvc_home(tmp_path: Path) -> DvcHome:
    home = DvcHome(tmp_path)
    _write_split(home.run / "data", TRAIN_ROWS)
    return home


def _files(store: Path) -> list[str]:
    """Every file under a DVC object store's files/md5/, as `xx/rest` relative paths."""
    base = store / "files" / "md5"
    return (
        sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        if base.is_dir()
        else []
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bad_objects(store: Path) -> list[str]:
    """Files a later run could take for a complete object but are not: an object name whose bytes do not
    hash to it, or any other name that is not DVC's temporary `*.tmp` (which DVC never reads as an object)."""
    bad = []
    for rel in _files(store):
        if OBJECT_RE.match(rel):
            if _md5(store / "files" / "md5" / rel) != rel.replace("/", "").removesuffix(".dir"):
                bad.append(f"{rel} (content does not match its name)")
        elif not rel.endswith(".tmp"):
            bad.append(f"{rel} (neither an object nor a temporary file)")
    return bad


def _remote_status(home: DvcHome, result: dict[str, Any]) -> dict[str, set[str]]:
    """`dvc status -c` for one version: the directory object and its files, cache against remote."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.status import compare_status

    ids = {HashInfo("md5", result["dataset_hash"])} | {HashInfo("md5", v) for v in result["files"].values()}
    config = {"core": {"remote": REMOTE_NAME}, "remote": {REMOTE_NAME: {"url": str(home.remote)}}}
    with Repo(str(home.origin), config=config) as repo:
        status = compare_status(repo.cache.local, repo.cloud.get_remote_odb(REMOTE_NAME, "status"), ids)
    return {name: {h.value for h in getattr(status, name)} for name in ("ok", "new", "missing", "deleted")}


def _kill(proc: subprocess.Popen[str], when: str, delay: float, home: DvcHome) -> dict[str, Any]:
    """SIGKILL `proc` `delay` s after its push began (the first file reached the remote: "timed"), or
    the moment the remote holds a partial object ("partial")."""
    started = (
        (lambda: any(rel.endswith(".tmp") for rel in _files(home.remote)))
        if when == "partial"
        else (lambda: bool(_files(home.remote)))
    )
    while proc.poll() is None and not started():
        time.sleep(0.005)
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    remote_files = _files(home.remote)
    return {
        "when": f"push+{delay:.2f}s" if when == "timed" else when,
        "alive": alive,
        "remote_objects": sum(bool(OBJECT_RE.match(rel)) for rel in remote_files),
        "remote_tmp": sum(rel.endswith(".tmp") for rel in remote_files),
        "cache_tmp": sum(rel.endswith(".tmp") for rel in _files(home.cache)),
        "version_json": (home.run / "version.json").exists(),
    }


def _measure(home: DvcHome) -> tuple[dict[str, Any], float, float]:
    """A clean run: its result, when the first file reached the remote, and when the process ended (run
    twice, the second timed: the first one pays for cold imports and a cold page cache)."""
    home.reset_stores()
    home.version()
    home.reset_stores()
    t0 = time.monotonic()
    proc = home.start()
    push_start = None
    while proc.poll() is None:
        if push_start is None and _files(home.remote):
            push_start = time.monotonic() - t0
        time.sleep(0.005)
    total = time.monotonic() - t0
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out[out.find("{") :]), push_start or total, total


def test_version_killed_mid_push_completes_on_the_next_run(dvc_home: DvcHome, tmp_path: Path) -> None:
    from tasks.core.config import load_config
    from tasks.stages.version import fetch_dataset

    home = dvc_home
    baseline, push_start, total = _measure(home)
    assert baseline["nfiles"] == 2 and baseline["pushed_objects"] == 3
    window = total - push_start
    plan = [("timed", f * window) for f in PUSH_FRACTIONS] + [("partial", 0.0)]

    kills = []
    for when, delay in plan:
        home.reset_stores()
        proc = home.start()
        state = _kill(proc, when, delay, home)
        if state["version_json"]:  # version.json claims a push: it is only written once all is pushed
            claimed = _remote_status(home, baseline)
            assert claimed["new"] == claimed["missing"] == set(), (state, claimed)
        state["bad_after_kill"] = _bad_objects(home.remote) + _bad_objects(home.cache)

        again = home.version()
        status = _remote_status(home, baseline)
        state["remote_tmp_after_rerun"] = sum(rel.endswith(".tmp") for rel in _files(home.remote))
        kills.append(state)
        assert again["dataset_hash"] == baseline["dataset_hash"], state
        assert again["files"] == baseline["files"], state
        assert status["new"] == status["missing"] == set(), (state, status)  # `dvc status -c`: clean
        assert status["ok"] == {baseline["dataset_hash"], *baseline["files"].values()}, (state, status)
        assert _bad_objects(home.remote) == _bad_objects(home.cache) == [], state
        assert json.loads((home.run / "version.json").read_text())["dataset_hash"] == baseline["dataset_hash"]

    print(f"push window {push_start:.2f}-{total:.2f}s; kills: {json.dumps(kills)}")
    # the plan landed inside the push at least once: the process was alive with the remote incomplete
    assert any(k["alive"] and (k["remote_objects"] < 3 or k["remote_tmp"]) for k in kills), kills

    # the last re-run's remote restores the version byte for byte into an empty clone (empty cache)
    from dvc.repo import Repo

    clone = tmp_path / "clone"
    clone.mkdir()
    Repo.init(str(clone), no_scm=True).close()
    cfg = load_config(home.params, overrides=[("data.dvc_remote", str(home.remote))])
    out = fetch_dataset(cfg, baseline["dataset_hash"], tmp_path / "restored", repo_root=clone)
    for name in ("train.jsonl", "eval.jsonl"):
        assert _md5(out / name) == _md5(home.run / "data" / name)
