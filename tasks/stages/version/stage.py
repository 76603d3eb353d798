"""Stage `version`: snapshot the validated split (run_dir/data) in DVC and push it to the remote.

How this coexists with dvc.yaml and a gitignored `runs/`:

- No `.dvc` file is written and nothing in the workspace changes. The stage uses DVC's own object
  layer (dvc_data's `build` + `transfer`, what `dvc add`/`dvc commit`/`dvc push` run underneath) to
  hash run_dir/data into a directory object, store it in the repository's DVC cache (.dvc/cache) and
  copy it to the remote. So it works for any run directory: runs/<dag run id>/ (gitignored),
  runs/dvc/ (an `outs` of the validate stage in dvc.yaml) or a temporary folder in tests, and it never
  competes with dvc.yaml/dvc.lock for ownership of a path.
- The split's files enter the cache by reflink or hardlink where the filesystem allows (copy otherwise:
  another filesystem), so a large split costs its disk once more only in the remote; DVC marks cache
  objects read-only, and so the split's files too when they are hardlinked.
- The hash is DVC's md5 of the directory (`<md5>.dir`), the same value `dvc add` or dvc.lock records
  for identical content: same bytes -> same `dataset_hash`, whichever way the data was versioned.
- It takes no repository lock (only locked commands such as `dvc add` do), so it also runs as a
  `dvc repro` stage command, and concurrent runs are safe: the cache and the remote are
  content-addressed and DVC writes each object atomically.
- The remote is `data.dvc_remote` from params (the one config): a local directory (relative to the
  repository root; default dvc-remote/, gitignored, the same place .dvc/config's default remote
  `local` names for plain `dvc push`), or any URL DVC supports (s3://, gs://, azure://, ...), passed
  as is. S3 needs this project's `s3` extra (dvc-s3). Credentials never go in the URL: they come from
  the store's own variables (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an
  S3-compatible server) or from `.dvc/config.local` (`dvc remote modify --local qa_lora
  credentialpath ...`). Every message, log line and version.json shows the remote redacted.
- A remote that cannot be reached, a missing bucket or refused credentials raise StoreUnavailable (one
  line naming the remote and the store's reason; Airflow retries it); a version the remote does not
  hold is a UserError.

:func:`fetch_dataset` brings a version back by hash from the remote into any DVC repository (for
example a fresh clone with an empty cache), which is how a past model's training data is recovered.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, write_json_atomic
from tasks.core.config import REPO_ROOT, Config
from tasks.core.errors import StoreUnavailable, UserError
from tasks.core.logs import adopt_library_loggers
from tasks.core.redact import redact, redact_uri

log = logging.getLogger("qa_lora.version")

# The DVC remote configured per call from data.dvc_remote; `.dvc/config.local` may add its credentials
# (`dvc remote modify --local qa_lora credentialpath ...`), which DVC merges under the URL.
REMOTE_NAME = "qa_lora"
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HASH_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")
EXPECTED_FILES = ("train.jsonl", "eval.jsonl")


def version_dataset(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Put run_dir/data into the DVC cache, push it to the remote, write run_dir/version.json.

    Args:
        cfg: the run's configuration (`data.dvc_remote`).
        run_dir: this run's directory; run_dir/data must hold the validated split.

    Returns:
        {"dataset_hash": DVC md5 of the directory, "remote": where it was pushed, "files": {name: md5},
        "nfiles", "size"}; the same dict is written to run_dir/version.json.

    Raises:
        UserError: no validated split (run `qa-lora validate` first) or no DVC project.
        StoreUnavailable: the remote cannot be reached or written (endpoint, bucket, credentials).
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.transfer import transfer
    from dvc_objects.fs.local import LocalFileSystem

    data_dir = Path(run_dir) / "data"
    missing = [name for name in EXPECTED_FILES if not (data_dir / name).is_file()]
    if missing:
        raise UserError(
            f"{data_dir}: no validated split ({', '.join(missing)} missing); run `qa-lora validate` first"
        )
    remote = _remote_url(cfg)
    with _open_repo(REPO_ROOT, remote) as repo:
        cache = repo.cache.local
        staging, meta, obj = build(cache, str(data_dir.resolve()), LocalFileSystem(), "md5")
        # Into the cache by reflink or hardlink where the filesystem allows (copy otherwise): a split of
        # hundreds of MB is not duplicated on the disk it lies on; the remote gets its one copy.
        transfer(staging, cache, {obj.hash_info}, shallow=False, hardlink=True)
        with _remote_errors(cfg, "push to", remote) as errors:
            odb = repo.cloud.get_remote_odb(REMOTE_NAME, "push")
            result = transfer(cache, odb, {obj.hash_info}, shallow=False)
        if result.failed:
            raise _store_unavailable(cfg, "push to", remote, errors.first, len(result.failed))
        files = {"/".join(key): entry.value for key, _, entry in obj}
    payload = {
        "dataset_hash": obj.hash_info.value,
        "remote": redact_uri(remote),
        "hash_name": "md5",
        "files": files,
        "nfiles": meta.nfiles,
        "size": meta.size,
        "pushed_objects": len(result.transferred),
    }
    write_json_atomic(Path(run_dir) / "version.json", payload)
    log.info("dataset %s (%d files) pushed to %s", payload["dataset_hash"], len(files), redact_uri(remote))
    return payload


def fetch_dataset(cfg: Config, dataset_hash: str, dest: Path, repo_root: Path | None = None) -> Path:
    """Pull a dataset version by hash from `data.dvc_remote` and write its files to `dest`.

    Args:
        cfg: configuration naming the remote (`data.dvc_remote`).
        dataset_hash: the `dataset_hash` of a version.json (`<md5>.dir`; the suffix is optional).
        dest: directory to create (replaced atomically if it exists).
        repo_root: the DVC repository whose cache receives the objects (default: this repository).

    Returns:
        `dest`, holding exactly the versioned files.

    Raises:
        UserError: a malformed hash, or a version the remote does not hold.
        StoreUnavailable: the remote cannot be reached or read (endpoint, bucket, credentials).
    """
    from dvc_data.hashfile import load
    from dvc_data.hashfile.checkout import checkout
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.transfer import transfer
    from dvc_objects.fs.local import LocalFileSystem

    if not _HASH_RE.match(dataset_hash):
        raise UserError(f"dataset hash {dataset_hash!r}: expected 32 hex digits, optionally with '.dir'")
    value = dataset_hash if dataset_hash.endswith(".dir") else f"{dataset_hash}.dir"
    remote = _remote_url(cfg)
    with _open_repo(Path(repo_root) if repo_root else REPO_ROOT, remote) as repo:
        cache = repo.cache.local
        hash_info = HashInfo("md5", value)
        try:
            with _remote_errors(cfg, "pull from", remote) as errors:
                odb = repo.cloud.get_remote_odb(REMOTE_NAME, "pull")
                result = transfer(odb, cache, {hash_info}, shallow=False)
        except StoreUnavailable as exc:
            missing = exc.__cause__
            if not isinstance(missing, FileNotFoundError):
                raise
            fault = _store_fault(missing)
            if fault is not None:
                raise _store_unavailable(cfg, "pull from", remote, fault) from fault
            # the store answered, and it does not hold this version: the hash is wrong, not the store
            raise UserError(f"dataset {value}: not found in the DVC remote {redact_uri(remote)}") from None
        if result.failed:
            raise _store_unavailable(cfg, "pull from", remote, errors.first, len(result.failed))
        obj = load(cache, hash_info)
        with atomic_dir(Path(dest)) as tmp:
            checkout(str(tmp), LocalFileSystem(), obj, cache, force=True)
    log.info("dataset %s fetched from %s into %s", value, redact_uri(remote), dest)
    return Path(dest)


def prune_snapshots(cfg: Config, drop: set[str], keep: set[str], *, dry_run: bool = False) -> dict[str, Any]:
    """Delete the local DVC cache objects of dataset versions only pruned runs used (the remote keeps them).

    Args:
        cfg: the configuration (`data.dvc_remote`, only to open the repository as the stage does).
        drop: `dataset_hash`es of the runs being deleted.
        keep: `dataset_hash`es of the runs that stay; their objects, and every object the workspace's
            dvc.lock uses, are never deleted (a file shared by two versions stays while one is kept).
        dry_run: count, delete nothing.

    Returns:
        {"objects": how many cache files go, "bytes": their size}.
    """
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    def objects(cache: Any, hashes: set[str]) -> set[str]:
        out: set[str] = set()
        for value in hashes:
            info = HashInfo("md5", value if value.endswith(".dir") else f"{value}.dir")
            if cache.exists(info.value):
                out.add(info.value)
                out.update(entry.value for _, _, entry in Tree.load(cache, info))
        return out

    if not drop:
        return {"objects": 0, "bytes": 0}
    with _open_repo(REPO_ROOT, _remote_url(cfg)) as repo:
        cache = repo.cache.local
        workspace = logging.getLogger("dvc")
        level, workspace.level = workspace.level, logging.ERROR  # outputs without a lock entry: not ours
        try:
            used = {info.value for infos in repo.used_objs().values() for info in infos}
        finally:
            workspace.setLevel(level)
        doomed = sorted(objects(cache, drop) - objects(cache, keep) - used)
        paths = [cache.oid_to_path(oid) for oid in doomed]
        size = sum(os.path.getsize(path) for path in paths if os.path.exists(path))
        if paths and not dry_run:
            cache.fs.remove(paths)
    log.info("DVC cache: %d object(s), %d bytes %s", len(paths), size, "would go" if dry_run else "deleted")
    return {"objects": len(paths), "bytes": size}


class _FirstError:
    """The first per-object failure DVC reported during a transfer (DVC logs those instead of raising)."""

    first: BaseException | None = None


class _CollectTransferErrors(logging.Filter):
    """Keeps the first exception of dvc_data's "failed to transfer" records and drops the records: the
    stage's one-line error names the reason, and the log holds no per-object traceback."""

    def __init__(self, sink: _FirstError) -> None:
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.sink.first = self.sink.first or record.exc_info[1]
            return False
        return True


@contextmanager
def _remote_errors(cfg: Config, action: str, remote: str) -> Iterator[_FirstError]:
    """Turn any failure inside the block into StoreUnavailable naming the (redacted) remote.

    DVC raises filesystem-specific errors (botocore, aiohttp, OSError) for a missing bucket, an
    unreachable endpoint or refused credentials; it reports per-object failures through its logger,
    collected here into the yielded holder's `first`.
    """
    sink = _FirstError()
    transfer_log = logging.getLogger("dvc_data.hashfile.transfer")
    collector = _CollectTransferErrors(sink)
    transfer_log.addFilter(collector)
    try:
        yield sink
    except Exception as exc:
        raise _store_unavailable(cfg, action, remote, exc) from exc
    finally:
        transfer_log.removeFilter(collector)


def _store_unavailable(
    cfg: Config, action: str, remote: str, exc: BaseException | None, failed: int = 0
) -> StoreUnavailable:
    """One line: the key as given, what failed where, and the store's own reason (all redacted)."""
    reason = " ".join(str(exc).split()) if exc is not None else ""
    reason = reason or (type(exc).__name__ if exc is not None else "no reason given")
    objects = f" ({failed} object(s) failed)" if failed else ""
    return StoreUnavailable(
        redact(f"data.dvc_remote={cfg.data.dvc_remote!r}: {action} {remote} failed{objects}: {reason[:300]}")
    )


def _store_fault(missing: FileNotFoundError) -> BaseException | None:
    """What under a FileNotFoundError shows that the store itself is absent or unreachable.

    Filesystems report both as "not found": s3fs turns NoSuchBucket into FileNotFoundError, fsspec's
    HTTP filesystem turns a refused connection into one. Only a bare miss means the version is absent.
    """
    cause: BaseException | None = missing
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "NoSuchBucket":
            return missing
        if isinstance(cause, (ConnectionError, TimeoutError)):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _remote_url(cfg: Config) -> str:
    """A URL as is; a local path resolved against the repository root."""
    remote = cfg.data.dvc_remote
    return remote if _URI_RE.match(remote) else str(cfg.resolve(remote))


@contextmanager
def _open_repo(root: Path, remote: str) -> Iterator[Any]:
    """The DVC repository at `root` with `remote` configured as its default remote, closed on exit."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    adopt_library_loggers("dvc", "dvc_objects", "dvc_data")  # DVC's own console handlers print unredacted
    if not (root / ".dvc").is_dir():
        raise UserError(f"{root}: not a DVC project (no .dvc/); run `dvc init` there")
    try:
        repo = Repo(
            str(root), config={"core": {"remote": REMOTE_NAME}, "remote": {REMOTE_NAME: {"url": remote}}}
        )
    except NotDvcRepoError as exc:
        raise UserError(f"{root}: not a DVC project ({exc})") from None
    try:
        yield repo
    finally:
        repo.close()
