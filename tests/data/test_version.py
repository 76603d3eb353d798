"""The version stage: a real DVC repository, cache and local remote; push, then pull into a clean clone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loopback_s3 import LoopbackS3, free_port

import tasks.stages.version.stage
from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import StoreUnavailable, UserError
from tasks.stages.version import fetch_dataset, version_dataset

REMOTE_NAME = (
    "qa_lora"  # the remote the stage configures from data.dvc_remote (.dvc/config.local may add to it)
)

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


def test_the_split_enters_the_cache_without_a_second_copy(
    tmp_path: Path, origin: Path, make_cfg: Callable[..., Config]
) -> None:
    """On one filesystem the cache object is the split's own file (a hardlink), not a copy: a split of
    hundreds of MB costs its disk once more only in the remote. A reflink-capable filesystem clones it
    instead (also no second copy of the blocks), and another filesystem forces DVC to copy."""
    import os

    from dvc_objects.fs.system import reflink

    run_dir = _split(tmp_path / "run", "t\n" * 1000, "e\n")
    md5 = version_dataset(make_cfg(tmp_path / "x.jsonl"), run_dir)["files"]["train.jsonl"]
    cached = origin / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    split = run_dir / "data" / "train.jsonl"
    assert cached.read_bytes() == split.read_bytes()
    if os.stat(cached).st_dev != os.stat(split).st_dev:
        pytest.skip("the DVC cache and the run directory are on different filesystems: DVC must copy")
    probe = tmp_path / "probe"
    probe.write_text("x")
    try:
        reflink(str(probe), str(tmp_path / "probe-clone"))
        pytest.skip("this filesystem clones files (reflink): the cache object is a clone, not the same inode")
    except OSError:
        pass
    assert os.path.samefile(cached, split)
    assert (tmp_path / "remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file()  # the remote's own copy


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


# ------------------------------------------------------------------------------- S3 remote (loopback)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackS3]:
    """A real S3-compatible server on loopback (moto, server mode, signatures checked)."""
    server = LoopbackS3(tmp_path_factory.mktemp("moto") / "moto.log")
    server.create_bucket(BUCKET)
    yield server
    server.stop()


def _aws_env(monkeypatch: pytest.MonkeyPatch, s3: LoopbackS3, **changes: str) -> None:
    for name, value in s3.env(**changes).items():
        monkeypatch.setenv(name, value)


BUCKET = "qa-lora-data"


def test_s3_remote_round_trip_push_then_pull_into_a_clean_clone(
    tmp_path: Path,
    origin: Path,
    make_cfg: Callable[..., Config],
    s3: LoopbackS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _aws_env(monkeypatch, s3)
    remote = f"s3://{BUCKET}/round-trip"
    cfg = make_cfg(tmp_path / "x.jsonl", ("data.dvc_remote", remote))
    run_dir = _split(tmp_path / "run", '{"id": "1"}\n', '{"id": "2"}\n')
    result = version_dataset(cfg, run_dir)
    assert result["remote"] == remote and result["pushed_objects"] == 3
    stored = s3.objects(BUCKET)
    md5 = result["dataset_hash"]
    assert f"round-trip/files/md5/{md5[:2]}/{md5[2:]}" in stored  # the directory object itself
    assert {k for k in stored if k.startswith("round-trip/")} == {
        f"round-trip/files/md5/{h[:2]}/{h[2:]}" for h in [md5, *result["files"].values()]
    }

    clone = tmp_path / "clone"
    subprocess.run([*_GIT, "clone", "-q", str(origin), str(clone)], check=True)
    out = fetch_dataset(cfg, md5, tmp_path / "restored", repo_root=clone)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (out / name).read_bytes() == (run_dir / "data" / name).read_bytes()


def test_s3_credentials_from_the_local_dvc_config_not_params(
    tmp_path: Path,
    origin: Path,
    make_cfg: Callable[..., Config],
    s3: LoopbackS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the README tells users: the URL in params, the credentials in `.dvc/config.local`
    (`dvc remote modify --local qa_lora credentialpath ...`), which git never sees."""
    env = s3.env()
    # dvc-s3 applies credentialpath only where AWS_SHARED_CREDENTIALS_FILE is unset, and then sets it in
    # this process: setenv-then-delenv makes monkeypatch restore the variable afterwards
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_SHARED_CREDENTIALS_FILE",
    ):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    for name in ("AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.setenv(name, env[name])
    creds = tmp_path / "aws-credentials"
    creds.write_text(
        f"[default]\naws_access_key_id = {s3.access_key_id}\naws_secret_access_key = {s3.secret_access_key}\n"
    )
    remote = f"s3://{BUCKET}/local-config"
    for key, value in (("url", remote), ("credentialpath", str(creds)), ("endpointurl", s3.url)):
        args = ["remote", "add", "--local", REMOTE_NAME, value] if key == "url" else None
        args = args or ["remote", "modify", "--local", REMOTE_NAME, key, value]
        done = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=origin, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
    assert "credentialpath" not in (origin / ".dvc" / "config").read_text()
    cfg = make_cfg(tmp_path / "x.jsonl", ("data.dvc_remote", remote))
    result = version_dataset(cfg, _split(tmp_path / "run", "t\n", "e\n"))
    assert result["pushed_objects"] == 3
    assert f"local-config/files/md5/{result['dataset_hash'][:2]}/{result['dataset_hash'][2:]}" in s3.objects(
        BUCKET
    )


def _closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


# case, remote, env changes, the store's reason (None: filled in from the closed endpoint)
S3_FAULTS = [
    ("missing-bucket", "s3://qa-lora-no-such-bucket/dvc", {}, "The specified bucket does not exist"),
    (
        "wrong-secret",
        f"s3://{BUCKET}/faults",
        {"AWS_SECRET_ACCESS_KEY": "not-the-secret-key-0123456789"},
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    ),
    (
        "unknown-key-id",
        f"s3://{BUCKET}/faults",
        {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000"},
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
    ("unreachable-endpoint", f"s3://{BUCKET}/faults", {"AWS_ENDPOINT_URL": "closed"}, None),
]


@pytest.mark.parametrize(("case", "remote", "changes", "reason"), S3_FAULTS, ids=[c[0] for c in S3_FAULTS])
def test_s3_push_faults_are_one_line_store_errors(
    tmp_path: Path,
    origin: Path,
    make_cfg: Callable[..., Config],
    s3: LoopbackS3,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    remote: str,
    changes: dict[str, str],
    reason: str | None,
) -> None:
    if changes.get("AWS_ENDPOINT_URL") == "closed":
        changes = {"AWS_ENDPOINT_URL": _closed_endpoint(), "AWS_MAX_ATTEMPTS": "1"}
        reason = f'Could not connect to the endpoint URL: "{changes["AWS_ENDPOINT_URL"]}/{BUCKET}"'
    _aws_env(monkeypatch, s3, **changes)
    run_dir = _split(tmp_path / "run", f"{case}\n", "e\n")
    with pytest.raises(StoreUnavailable) as err:
        version_dataset(make_cfg(tmp_path / "x.jsonl", ("data.dvc_remote", remote)), run_dir)
    assert str(err.value) == f"data.dvc_remote='{remote}': push to {remote} failed: {reason}"
    assert not (run_dir / "version.json").exists()


PULL_FAULTS = [
    ("missing-bucket", "s3://qa-lora-no-such-bucket/dvc", {}, "The specified bucket does not exist"),
    # S3 answers a HEAD with a bad signature by a bare 403: no body, so no more detail than this
    ("wrong-secret", None, {"AWS_SECRET_ACCESS_KEY": "not-the-secret-key-0123456789"}, "Forbidden"),
    ("unreachable-endpoint", None, {"AWS_ENDPOINT_URL": "closed"}, None),
]


@pytest.mark.parametrize(
    ("case", "remote", "changes", "reason"), PULL_FAULTS, ids=[c[0] for c in PULL_FAULTS]
)
def test_s3_pull_faults_are_one_line_store_errors_and_unknown_hashes_user_errors(
    tmp_path: Path,
    origin: Path,
    make_cfg: Callable[..., Config],
    s3: LoopbackS3,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    remote: str | None,
    changes: dict[str, str],
    reason: str | None,
) -> None:
    _aws_env(monkeypatch, s3)
    pushed_to = f"s3://{BUCKET}/pull-faults"
    version = version_dataset(
        make_cfg(tmp_path / "x.jsonl", ("data.dvc_remote", pushed_to)), _split(tmp_path / "run", "p\n", "e\n")
    )
    shutil.rmtree(origin / ".dvc" / "cache")  # only the remote has the data now
    remote = remote or pushed_to
    cfg = make_cfg(tmp_path / "x.jsonl", ("data.dvc_remote", remote))
    # control: with the right settings an unknown hash is the user's mistake, not the store's
    if remote == pushed_to:
        with pytest.raises(UserError) as miss:
            fetch_dataset(cfg, "f" * 32, tmp_path / "out")
        assert not isinstance(miss.value, StoreUnavailable)
        assert str(miss.value) == f"dataset {'f' * 32}.dir: not found in the DVC remote {remote}"
    if changes.get("AWS_ENDPOINT_URL") == "closed":
        changes = {"AWS_ENDPOINT_URL": _closed_endpoint(), "AWS_MAX_ATTEMPTS": "1"}
        reason = f'Could not connect to the endpoint URL: "{changes["AWS_ENDPOINT_URL"]}/{BUCKET}"'
    _aws_env(monkeypatch, s3, **changes)
    with pytest.raises(StoreUnavailable) as err:
        fetch_dataset(cfg, version["dataset_hash"], tmp_path / "out")
    assert str(err.value) == f"data.dvc_remote='{remote}': pull from {remote} failed: {reason}"
    assert not (tmp_path / "out").exists()


def test_credentials_in_the_remote_url_never_reach_a_message(
    tmp_path: Path, origin: Path, make_cfg: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    """A remote URL with user-info (discouraged, but possible): push and pull fail on a closed port, and
    neither the error nor any log record shows the password."""
    endpoint = _closed_endpoint()
    remote = f"https://bob:DvcRemotePw-5e1f@{endpoint.removeprefix('http://')}/remote"
    shown = f"https://***@{endpoint.removeprefix('http://')}/remote"
    port = endpoint.rsplit(":", 1)[1]
    cfg = make_cfg(tmp_path / "x.jsonl", ("data.dvc_remote", remote))
    with pytest.raises(StoreUnavailable) as push:
        version_dataset(cfg, _split(tmp_path / "run", "t\n", "e\n"))
    assert str(push.value) == (
        f"data.dvc_remote='{shown}': push to {shown} failed (3 object(s) failed): "
        f"Cannot connect to host 127.0.0.1:{port} ssl:default [Connect call failed ('127.0.0.1', {port})]"
    )
    with pytest.raises(StoreUnavailable) as pull:
        fetch_dataset(cfg, "a" * 32, tmp_path / "out")
    assert str(pull.value) == (
        f"data.dvc_remote='{shown}': pull from {shown} failed: [Errno 111] Connect call failed ('127.0.0.1', {port})"
    )
    assert "DvcRemotePw-5e1f" not in caplog.text
