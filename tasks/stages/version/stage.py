"""Stage `version`: snapshot the validated split (run_dir/data) in DVC and push it to the remote.

How this coexists with dvc.yaml and a gitignored `runs/`:

- No `.dvc` file is written and nothing in the workspace changes. The stage uses DVC's own object
  layer (dvc_data's `build` + `transfer`, what `dvc add`/`dvc commit`/`dvc push` run underneath) to
  hash run_dir/data into a directory object, store it in the repository's DVC cache (.dvc/cache) and
  copy it to the remote. So it works for any run directory: runs/<dag run id>/ (gitignored),
  runs/dvc/ (an `outs` of the validate stage in dvc.yaml) or a temporary folder in tests, and it never
  competes with dvc.yaml/dvc.lock for ownership of a path.
- The hash is DVC's md5 of the directory (`<md5>.dir`), the same value `dvc add` or dvc.lock records
  for identical content: same bytes -> same `dataset_hash`, whichever way the data was versioned.
- It takes no repository lock (only locked commands such as `dvc add` do), so it also runs as a
  `dvc repro` stage command, and concurrent runs are safe: the cache and the remote are
  content-addressed and DVC writes each object atomically.
- The remote is `data.dvc_remote` from params (the one config): a local directory (relative to the
  repository root; default dvc-remote/, gitignored, the same place .dvc/config's default remote
  `local` names for plain `dvc push`), or any URL DVC supports (s3://, gs://, azure://, ...), passed
  as is. Cloud remotes need the matching extra (e.g. `pip install dvc[s3]`).

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

log = logging.getLogger("qa_lora.version")

_REMOTE = "qa_lora"  # name of the remote, configured per call from data.dvc_remote
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
        UserError: no validated split (run `qa-lora validate` first), no DVC project, or a failed push.
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
        transfer(staging, cache, {obj.hash_info}, shallow=False)
        try:
            odb = repo.cloud.get_remote_odb(_REMOTE, "push")
            result = transfer(cache, odb, {obj.hash_info}, shallow=False)
        except Exception as exc:  # DVC raises filesystem-specific errors (permissions, credentials)
            raise StoreUnavailable(
                f"data.dvc_remote={cfg.data.dvc_remote!r}: push to {remote} failed ({exc})"
            ) from None
        if result.failed:
            raise StoreUnavailable(
                f"data.dvc_remote={cfg.data.dvc_remote!r}: {len(result.failed)} object(s) failed to push to {remote}"
            )
        files = {"/".join(key): entry.value for key, _, entry in obj}
    payload = {
        "dataset_hash": obj.hash_info.value,
        "remote": remote,
        "hash_name": "md5",
        "files": files,
        "nfiles": meta.nfiles,
        "size": meta.size,
        "pushed_objects": len(result.transferred),
    }
    write_json_atomic(Path(run_dir) / "version.json", payload)
    log.info("dataset %s (%d files) pushed to %s", payload["dataset_hash"], len(files), remote)
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
        odb = repo.cloud.get_remote_odb(_REMOTE, "pull")
        try:
            result = transfer(odb, cache, {hash_info}, shallow=False)
            obj = load(cache, hash_info)
        except (FileNotFoundError, OSError) as exc:
            raise UserError(f"dataset {value}: not found in the DVC remote {remote} ({exc})") from None
        if result.failed:
            raise UserError(
                f"dataset {value}: {len(result.failed)} object(s) missing in the DVC remote {remote}"
            )
        with atomic_dir(Path(dest)) as tmp:
            checkout(str(tmp), LocalFileSystem(), obj, cache, force=True)
    log.info("dataset %s fetched from %s into %s", value, remote, dest)
    return Path(dest)


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

    if not (root / ".dvc").is_dir():
        raise UserError(f"{root}: not a DVC project (no .dvc/); run `dvc init` there")
    try:
        repo = Repo(str(root), config={"core": {"remote": _REMOTE}, "remote": {_REMOTE: {"url": remote}}})
    except NotDvcRepoError as exc:
        raise UserError(f"{root}: not a DVC project ({exc})") from None
    try:
        yield repo
    finally:
        repo.close()
