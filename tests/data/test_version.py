"""The version stage: a real DVC repository, cache and local remote; push, then pull into a clean clone."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import tasks.stages.version.stage
from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import UserError
from tasks.stages.version import fetch_dataset, version_dataset

_GIT = ["git", "-c", "user.name=qa-lora-test", "-c", "user.email=test@example.invalid"]


def _dvc_git_repo(path: Path) -> Path:
    """A git repository with `dvc init` committed, as a team's checkout would be."""
    from dvc.repo import Repo

    path.mkdir()
    subprocess.run([*_GIT, "init", "-q", str(path)], check=True)
    Repo.init(str(path)).close()
    subprocess.run([*_GIT, "-C", str(path), "add", ".dvc", ".dvcignore"], check=True)
    subprocess.run([*_GIT, "-C", str(path), "commit", "-q", "-m", "dvc init"], check=True)
    return path


def _split(run_dir: Path, train: str, evals: str) -> Path:
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text(train, encoding="utf-8")
    (data / "eval.jsonl").write_text(evals, encoding="utf-8")
    return run_dir


@pytest.fixture
def origin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Version into a throwaway DVC repository instead of this checkout's cache."""
    repo = _dvc_git_repo(tmp_path / "origin")
    monkeypatch.setattr(tasks.stages.version.stage, "REPO_ROOT", repo)
    return repo


def test_round_trip_push_then_pull_into_a_clean_clone(
    tmp_path: Path, origin: Path, make_cfg: Callable[..., Config]
) -> None:
    cfg = make_cfg(tmp_path / "unused.jsonl")  # data.dvc_remote = tmp_path/remote
    run_dir = _split(tmp_path / "run", '{"id": "1", "question": "q?", "answer": "a"}\n', '{"id": "2"}\n')
    result = version_dataset(cfg, run_dir)

    assert result["dataset_hash"].endswith(".dir") and len(result["dataset_hash"]) == 36
    assert result["remote"] == str(tmp_path / "remote")
    assert set(result["files"]) == {"train.jsonl", "eval.jsonl"} and result["nfiles"] == 2
    assert json.loads((run_dir / "version.json").read_text()) == result
    assert (tmp_path / "remote" / "files" / "md5").is_dir()
    assert not list(run_dir.rglob("*.dvc"))  # nothing written beside the data

    clone = tmp_path / "clone"
    subprocess.run([*_GIT, "clone", "-q", str(origin), str(clone)], check=True)
    assert not (clone / ".dvc" / "cache").exists()  # a clean clone: only the remote has the data
    out = fetch_dataset(cfg, result["dataset_hash"], tmp_path / "restored", repo_root=clone)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (out / name).read_bytes() == (run_dir / "data" / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "train.jsonl"]


def test_same_content_same_hash_and_a_change_changes_it(
    tmp_path: Path, origin: Path, make_cfg: Callable[..., Config]
) -> None:
    cfg = make_cfg(tmp_path / "unused.jsonl")
    first = version_dataset(cfg, _split(tmp_path / "a", "t\n", "e\n"))
    again = version_dataset(cfg, _split(tmp_path / "b", "t\n", "e\n"))
    changed = version_dataset(cfg, _split(tmp_path / "c", "t\n", "e2\n"))
    assert first["dataset_hash"] == again["dataset_hash"] != changed["dataset_hash"]
    assert again["pushed_objects"] == 0  # already in the remote: nothing to send


def test_hash_equals_what_dvc_add_records(
    tmp_path: Path, origin: Path, make_cfg: Callable[..., Config]
) -> None:
    """dvc.lock / `dvc add` and this stage name identical content with the same hash."""
    import yaml
    from dvc.repo import Repo

    _split(origin / "snap", "t\n", "e\n")
    with Repo(str(origin)) as repo:
        repo.add(str(origin / "snap" / "data"))
    recorded = yaml.safe_load((origin / "snap" / "data.dvc").read_text())["outs"][0]["md5"]
    assert version_dataset(make_cfg(tmp_path / "x.jsonl"), origin / "snap")["dataset_hash"] == recorded


def test_version_needs_a_validated_split(
    tmp_path: Path, origin: Path, make_cfg: Callable[..., Config]
) -> None:
    with pytest.raises(UserError) as err:
        version_dataset(make_cfg(tmp_path / "x.jsonl"), tmp_path / "run")
    assert str(err.value) == (
        f"{tmp_path / 'run' / 'data'}: no validated split (train.jsonl, eval.jsonl missing); "
        "run `qa-lora validate` first"
    )


def test_fetch_refuses_bad_and_unknown_hashes(
    tmp_path: Path, origin: Path, make_cfg: Callable[..., Config]
) -> None:
    cfg = make_cfg(tmp_path / "x.jsonl")
    with pytest.raises(UserError, match=r"dataset hash 'abc': expected 32 hex digits"):
        fetch_dataset(cfg, "abc", tmp_path / "out")
    with pytest.raises(
        UserError, match=rf"dataset {'0' * 32}\.dir: not found in the DVC remote {tmp_path / 'remote'}"
    ):
        fetch_dataset(cfg, "0" * 32, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_this_repository_is_a_dvc_project_with_a_local_default_remote() -> None:
    from dvc.repo import Repo

    with Repo(str(REPO_ROOT)) as repo:
        remote = repo.config["core"]["remote"]
        url = repo.config["remote"][remote]["url"]
    assert Path(url).resolve() == (REPO_ROOT / "dvc-remote").resolve()
