"""Retention against the real stores: five runs registered in a real MLflow registry (SQLite, local
artifact store), their data versioned in a real DVC repository; `qa-lora gc` keeps two.

The runs are copies of one exported run (export is the expensive part and is the real stage, once); each
gets its own training split (versioned: its own DVC objects; the eval split is shared, so one file object
is used by every version) and is registered and promoted in turn, as weekly runs would be. Then:
run-5 is this run and the champion, run-4 the previous champion, run-3 was written a moment ago (in
progress). With keep_runs=2, run-1 and run-2 go: their directories, their registry versions and
artifacts, and the DVC objects only they used. The champion still loads as `models:/qa-lora@champion`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from champion_fixture import build_champion

import tasks.stages.version.stage
from tasks.core.config import load_config, save_config
from tasks.core.layout import EFFECTIVE_PARAMS
from tasks.runners.cli import main
from tasks.stages.register import register_model
from tasks.stages.version import version_dataset

pytestmark = pytest.mark.slow
NAME = "qa-lora"
DAY = 86400.0


def _age(run: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    for path in [run, *run.rglob("*")]:
        os.utime(path, (stamp, stamp), follow_symlinks=False)


@pytest.fixture(scope="module")
def five_runs(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("retention")
    built = build_champion(root / "elsewhere", tiny_base, model_name=NAME)  # v1: a run outside the root
    dvc_repo = root / "project"
    dvc_repo.mkdir()
    Repo.init(str(dvc_repo), no_scm=True).close()
    mp = pytest.MonkeyPatch()
    mp.setattr(tasks.stages.version.stage, "REPO_ROOT", dvc_repo)  # version into this repo's cache
    cfg = load_config(
        overrides=[
            ("register.tracking_uri", built["tracking_uri"]),
            ("register.model_name", NAME),
            ("base.name_or_path", str(tiny_base)),
            ("data.dvc_remote", str(root / "remote")),
        ]
    )
    runs = root / "runs"
    hashes = {}
    for i in range(1, 6):
        run = runs / f"run-{i}"
        shutil.copytree(built["run"], run, ignore=shutil.ignore_patterns("register"))
        (run / "data/train.jsonl").write_text(
            json.dumps({"id": str(i), "question": f"q{i}?", "answer": "a"}) + "\n"
        )
        hashes[run.name] = version_dataset(cfg, run)["dataset_hash"]
        gate = json.loads((run / "eval/gate.json").read_text())
        gate["champion_version"] = str(i)  # the champion this run's gate compared against: the one before
        (run / "eval/gate.json").write_text(json.dumps(gate))
        save_config(cfg, run / EFFECTIVE_PARAMS)
        assert register_model(cfg, run)["promoted"]
        _age(run, 10 - i)  # weekly-ish: run-1 is the oldest
    (runs / "run-3" / "eval" / "note.txt").write_text("still being written")  # run-3: in progress
    yield {"cfg": cfg, "runs": runs, "hashes": hashes, "dvc_repo": dvc_repo, "uri": built["tracking_uri"]}
    mp.undo()


def _gc(cfg_uri: str, runs: Path, *extra: str, capsys) -> dict:
    args = [
        "gc",
        "--run-dir",
        str(runs / "run-5"),
        "--set",
        "runtime.keep_runs=2",
        "--set",
        "runtime.busy_hours=1",
    ]
    args += ["--set", f"register.tracking_uri={cfg_uri}", "--set", f"register.model_name={NAME}", *extra]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def _versions(uri: str) -> dict[str, str]:
    """run directory name -> version, of every version left."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return {
        Path(v.tags["qa_lora.run_dir"]).name: str(v.version)
        for v in client.search_model_versions(f"name='{NAME}'")
    }


def _cache_has(dvc_repo: Path, dataset_hash: str) -> bool:
    from dvc.repo import Repo

    with Repo(str(dvc_repo)) as repo:
        return repo.cache.local.exists(dataset_hash)


def test_gc_keeps_two_runs_and_never_what_an_alias_or_a_running_run_needs(five_runs, capsys) -> None:
    import mlflow

    runs, uri, hashes = five_runs["runs"], five_runs["uri"], five_runs["hashes"]
    before = _versions(uri)
    assert set(before) == {"champion-run", *(f"run-{i}" for i in range(1, 6))}

    dry = _gc(uri, runs, "--dry-run", capsys=capsys)
    assert sorted(Path(d["run_dir"]).name for d in dry["deleted"]) == ["run-1", "run-2"]
    assert sorted(Path(v["run_dir"]).name for v in dry["versions"]) == ["run-1", "run-2"]
    assert all(d["bytes"] > 0 for d in dry["deleted"] + dry["versions"]) and dry["dvc_cache"]["objects"] == 4
    assert (
        dry["bytes_freed"]
        == sum(d["bytes"] for d in dry["deleted"] + dry["versions"]) + dry["dvc_cache"]["bytes"]
    )
    assert sorted(p.name for p in runs.iterdir()) == [f"run-{i}" for i in range(1, 6)]  # nothing gone
    assert _versions(uri) == before

    done = _gc(uri, runs, capsys=capsys)
    reasons = {Path(k["run_dir"]).name: k["reason"] for k in done["kept"]}
    assert reasons["run-5"] == "this run" and reasons["run-4"].startswith("previous")
    assert reasons["run-3"] == "in progress" and set(reasons) == {"run-3", "run-4", "run-5"}
    assert sorted(p.name for p in runs.iterdir()) == ["run-3", "run-4", "run-5"]
    left = _versions(uri)
    assert set(left) == {"champion-run", "run-3", "run-4", "run-5"}  # a run outside the root is not ours
    for name in ("run-1", "run-2"):  # the DVC objects only they used are gone, the others' stay
        assert not _cache_has(five_runs["dvc_repo"], hashes[name])
    for name in ("run-3", "run-4", "run-5"):
        assert _cache_has(five_runs["dvc_repo"], hashes[name])

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == left["run-5"]
    mlflow.set_registry_uri(uri)
    assert mlflow.pyfunc.load_model(f"models:/{NAME}@champion") is not None
    assert "delete v" in client.get_registered_model(NAME).description  # the audit log says what went

    again = _gc(uri, runs, capsys=capsys)
    assert again["deleted"] == [] and again["versions"] == [] and again["bytes_freed"] == 0
