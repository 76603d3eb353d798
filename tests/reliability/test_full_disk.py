"""A full disk loses nothing: export and register against a small filesystem of their own (a tmpfs
mounted by the test; skipped, with the reason, where it cannot be mounted) that fills up mid-write.

The candidate's run directory and the registry's artifact store are on the tmpfs; the champion (an
earlier version) and the registry database are not. Export: another writer fills the disk once the
export's temporary directory appears; register: the disk has room for the files being uploaded but not
for the filesystem's overhead around them. Each time the command fails with one line naming the path,
the space needed and the space free; no export and no half-uploaded artifacts are left; the registry has
no new version and the champion is untouched. Once the space is freed, the same command succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from champion_fixture import build_champion
from conftest import QA_LORA

from tasks.core.config import load_config, save_config
from tasks.core.layout import EFFECTIVE_PARAMS
from tasks.stages.export.memory import export_disk_need

pytestmark = pytest.mark.slow
NAME = "qa-lora-disk"
MIB = 2**20


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of its own (root only), unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    size = 512 * MIB  # only what is written counts: the filler decides what is free
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or 'not root'}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int = 0) -> Path:
    """Write a filler file until only `leave` bytes are free (all of it with 0)."""
    filler = disk / "filler.bin"
    with filler.open("ab") as fh:
        while (free := shutil.disk_usage(disk).free) > leave:
            try:
                fh.write(b"\0" * min(free - leave, 8 * MIB))
                fh.flush()
            except OSError:
                break
    return filler


def _qa_lora(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it (its own process: its exit code and stderr are what they see)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([QA_LORA, *args], capture_output=True, text=True, env=env, timeout=900)


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    """The one error line a user reads at the end of stderr (the logs above it are the progress)."""
    err = done.stderr.strip()
    errors = [line for line in err.splitlines() if line.startswith("qa-lora: error: ")]
    assert done.returncode == 2 and len(errors) == 1 and err.splitlines()[-1] == errors[0], err[-3000:]
    assert "Traceback" not in err
    return errors[0]


def _champion_and_versions(uri: str) -> tuple[str, list[str]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = str(client.get_model_version_by_alias(NAME, "champion").version)
    return champion, sorted(str(v.version) for v in client.search_model_versions(f"name='{NAME}'"))


def test_a_full_disk_fails_export_and_register_in_one_line_and_loses_nothing(
    tmp_path: Path, small_disk: Path, tiny_base: Path
) -> None:
    champion = build_champion(tmp_path / "champion", tiny_base, model_name=NAME)
    uri = champion["tracking_uri"]
    before = _champion_and_versions(uri)
    run = small_disk / "run"
    shutil.copytree(champion["run"], run, ignore=shutil.ignore_patterns("export", "register"))
    gate = json.loads((run / "eval/gate.json").read_text())
    (run / "eval/gate.json").write_text(json.dumps({**gate, "champion_version": before[0]}))
    sets = {
        "register.tracking_uri": uri,
        "register.model_name": NAME,
        "register.experiment": "full-disk",  # its artifact root is on the small disk
        "register.artifact_location": (small_disk / "artifacts").as_uri(),
        "base.name_or_path": str(tiny_base),
        "export.parity_prompts": 2,
        "export.parity_new_tokens": 4,
        "runtime.device": "cpu",
    }
    cfg = load_config(overrides=list(sets.items()))
    save_config(cfg, run / EFFECTIVE_PARAMS)
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")] + ["--run-dir", str(run)]
    need = export_disk_need(cfg, str(tiny_base))
    assert shutil.disk_usage(small_disk).free > need  # the export passes the check before writing

    # Export: another writer fills the disk as soon as the export starts writing.
    def fill_when_writing() -> None:
        deadline = time.monotonic() + 300
        while not (run / ".tmp-export").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        _fill(small_disk)

    filler_thread = threading.Thread(target=fill_when_writing, daemon=True)
    filler_thread.start()
    failed = _qa_lora("export", *args)
    filler_thread.join()
    err = _one_line_error(failed)
    assert f"{run / 'export'}: no space for the export" in err and "needs about" in err and "MiB free" in err
    assert not (run / "export").exists() and not list(run.glob(".tmp-*"))  # nothing half-written
    assert _champion_and_versions(uri) == before
    (small_disk / "filler.bin").unlink()
    assert _qa_lora("export", *args).returncode == 0  # the same command, once the space is back

    # Register: room for the files, not for the filesystem's overhead around them.
    tree = sum(
        f.stat().st_size
        for d in ("train/adapter", "export/merged", "export/onnx", "eval")
        for f in (run / d).rglob("*")
        if f.is_file()
    )
    artifacts = small_disk / "artifacts"
    artifacts.mkdir()
    _fill(small_disk, leave=tree + 64 * 1024)
    used_before = shutil.disk_usage(small_disk).used
    err = _one_line_error(_qa_lora("register", *args))
    assert "no space for the registered artifacts" in err and str(artifacts) in err, err
    assert _champion_and_versions(uri) == before  # no version, the champion where it was
    assert shutil.disk_usage(small_disk).used <= used_before  # the partial upload was deleted
    assert not (run / "register").exists()
    (small_disk / "filler.bin").unlink()
    assert _qa_lora("register", *args).returncode == 0
    registration = json.loads((run / "register" / "registration.json").read_text())
    champion_now, versions = _champion_and_versions(uri)
    assert registration["version"] in versions and len(versions) == len(before[1]) + 1
    assert champion_now == registration["version"]  # its gate compared against the champion it replaced
    assert os.listdir(artifacts)  # the registered tree is on the small disk
