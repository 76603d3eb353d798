"""Security: no remote code unless asked, no pickle weights unless allowed, no secret in any output,
an install reproducible from the pinned constraints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    QA_LORA,
    REPO,
    S3_BUCKET,
    SECRET_VALUES,
    SECRETS,
    Home,
    registry_versions,
    secret_env,
    write_dataset,
)
from loopback_s3 import LoopbackS3, free_port

# ------------------------------------------------------------------------------------ trust_remote_code

EVIL_CONFIG = """\
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = {model_type!r}
"""
EVIL_TOKENIZER = """\
from pathlib import Path
Path({marker!r}).write_text("custom tokenizer code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _evil_base(tiny_base: Path, dest: Path, model_type: str = "llama") -> tuple[Path, Path]:
    """A copy of the tiny base whose config and tokenizer point (auto_map) at code that leaves a marker."""
    shutil.copytree(tiny_base, dest)
    marker = dest.parent / f"{dest.name}.MARKER"
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker), model_type=model_type))
    tok = json.loads((dest / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (dest / "tokenizer_config.json").write_text(json.dumps(tok))
    (dest / "tokenization_evil.py").write_text(EVIL_TOKENIZER.format(marker=str(marker)))
    return dest, marker


def _stage(home: Home, command: str, run_dir: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    return home.run(command, run_dir, *sets)


@pytest.fixture
def home(tmp_path: Path, tiny_base: Path) -> Home:
    h = Home(tmp_path / "home", tiny_base)
    write_dataset(h.root / "data" / "qa.jsonl")
    return h


@pytest.mark.slow
def test_remote_code_in_a_base_model_is_not_executed_by_default(
    home: Home, tiny_base: Path, tmp_path: Path
) -> None:
    """validate (tokenizer) and train (config, model, tokenizer) load an auto_map base without running it."""
    base, marker = _evil_base(tiny_base, tmp_path / "evil-base")
    run = tmp_path / "run"
    sets = (f"base.name_or_path={base}", "train.max_steps=1", "train.save_steps=100")
    for stage in ("validate", "train"):
        done = _stage(home, stage, run, *sets)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not marker.exists(), f"{stage} executed the base model's custom code"
    assert (run / "train" / "adapter" / "adapter_model.safetensors").is_file()

    # Control: the same directory does run its code when trust_remote_code is on (so the test can fail).
    control = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from transformers import AutoConfig;"
            "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)",
            str(base),
        ],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert control.returncode == 0, control.stderr[-2000:]
    assert marker.exists()


def test_custom_architecture_needing_remote_code_is_refused(
    home: Home, tiny_base: Path, tmp_path: Path
) -> None:
    base, marker = _evil_base(tiny_base, tmp_path / "evil-arch", model_type="evil-llama")
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    for name in ("train", "eval"):
        write_dataset(run / "data" / f"{name}.jsonl", 24)
    done = _stage(home, "train", run, f"base.name_or_path={base}")
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("qa-lora: error: base.name_or_path") and "base.trust_remote_code: true" in line, (
        line
    )
    assert "Traceback" not in done.stderr
    assert not marker.exists()
    assert not (run / "train" / "adapter").exists()


# ----------------------------------------------------------------------------------------- pickle weights

PICKLE_PAYLOAD = """\
import os, pickle, sys
class Payload:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
with open(sys.argv[1], "wb") as fh:
    pickle.dump({"model.embed_tokens.weight": Payload()}, fh)
"""


def test_pickle_only_weights_are_refused_and_never_unpickled(
    home: Home, tiny_base: Path, tmp_path: Path
) -> None:
    base = tmp_path / "pickled-base"
    shutil.copytree(tiny_base, base, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "PICKLE_MARKER"
    made = subprocess.run(
        [sys.executable, "-c", PICKLE_PAYLOAD, str(base / "pytorch_model.bin"), str(marker)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    for name in ("train", "eval"):
        write_dataset(run / "data" / f"{name}.jsonl", 24)
    done = _stage(home, "train", run, f"base.name_or_path={base}")
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert "only pickle files (pytorch_model.bin)" in line and "base.allow_pickle_weights=true" in line, line
    assert not marker.exists(), "the pickle was loaded"
    assert not (run / "train").exists()


# ---------------------------------------------------------------------------------------------- secrets


def _readable_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.slow  # the journey trains and exports
def test_planted_secrets_reach_no_output(journey: dict[str, Any]) -> None:
    """Every stage ran (and was killed, resumed, re-run) with tokens and passwords in its environment;
    none appears in any file the runs wrote: run dirs (params snapshot, reports, model card, summaries),
    the MLflow database and artifact store (tags, params), the DVC remote, the eval cache, or the logs."""
    home: Home = journey["home"]
    for name, value in SECRETS.items():
        assert home.env[name] == value
    files = _readable_files(home.root)
    kinds = {p.name for p in files}
    # the scan covers what matters: snapshot, card, registry, logs
    assert {"params.effective.yaml", "README.md", "mlflow.db", "registration.json", "gate.json"} <= kinds
    assert any(p.suffix == ".log" for p in files) and any("mlartifacts" in p.parts for p in files)
    needles = [v.encode() for v in SECRET_VALUES]
    leaks = [(str(p), n.decode()) for p in files for n in needles if n in p.read_bytes()]
    assert not leaks, leaks


# Credentials planted in the URIs the pipeline really uses (the environment-only secrets above are read
# by no code path that could print them).
TRACKING_PASSWORD = "S3cr3tPW-tracking-7d1e"
DVC_PASSWORD = "DvcRemotePw-reliability-4a6c"


@pytest.fixture(scope="module")
def credential_runs(journey: dict[str, Any], s3_server: LoopbackS3) -> dict[str, Any]:
    """Stages run with credentials in register.tracking_uri, data.dvc_remote and the environment, on
    paths that fail (closed port, hub id offline) and paths that succeed (S3 remote on loopback, a
    registration whose config carries a credentialed remote). Everything they write stays under the
    journey's home (logs included) for the scan."""
    home: Home = journey["home"]
    root = home.root / "credentials"
    port = free_port()
    tracking = f"http://alice:{TRACKING_PASSWORD}@127.0.0.1:{port}/"
    dvc_remote = f"https://bob:{DVC_PASSWORD}@127.0.0.1:{port}/remote"
    registry = f"sqlite:///{root / 'mlflow.db'}"
    out: dict[str, Any] = {"port": port, "registry": registry}

    def copy(name: str, *skip: str) -> Path:
        return Path(shutil.copytree(journey["run"], root / name, ignore=shutil.ignore_patterns(*skip)))

    # failing paths: the issue's own command, register against a closed port, a DVC remote with user-info
    out["train"] = home.run("train", copy("train", "train", "register"), f"register.tracking_uri={tracking}")
    out["register"] = home.run("register", copy("register", "register"), f"register.tracking_uri={tracking}")
    out["version_fail"] = home.run(
        "version", copy("version-fail", "register"), f"data.dvc_remote={dvc_remote}"
    )
    out["hub"] = home.run("validate", root / "hub", "base.name_or_path=qa-lora-org/private-base")
    # succeeding paths: an S3 remote whose secret key is in the environment; a registration whose
    # config (params snapshot, tags, card) carries the credentialed URIs
    s3_remote = f"s3://{S3_BUCKET}/credentials"
    version_run = copy("version-ok", "register")
    out["version_ok"] = home.run("version", version_run, f"data.dvc_remote={s3_remote}", env=s3_server.env())
    out["version_json"] = version_run / "version.json"
    leaky = ("data.dvc_remote=" + dvc_remote, f"register.tracking_uri={registry}")
    reg_run = copy("register-ok", "register", "params.effective.yaml")
    out["prepare"] = home.python(
        "import sys; from pathlib import Path; from tasks.core.config import load_config;"
        "from tasks.runners.pipeline import prepare_run;"
        "prepare_run(load_config(sys.argv[1], sys.argv[3:]), Path(sys.argv[2]))",
        str(home.params),
        str(reg_run),
        *leaky,
    )
    out["register_ok"] = home.run("register", reg_run, *leaky)
    out["register_run"] = reg_run
    out["s3_objects"] = s3_server.objects(S3_BUCKET)
    out["registry_state"] = registry_versions(home, registry)
    out["needles"] = [*SECRET_VALUES, TRACKING_PASSWORD, DVC_PASSWORD, s3_server.secret_access_key]
    return out


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [x for x in done.stderr.splitlines() if x.startswith("qa-lora: error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.mark.slow  # the journey trains and exports
def test_credentials_in_uris_are_masked_in_every_error_line(credential_runs: dict[str, Any]) -> None:
    """Each failing path really used the credentialed URI (its masked form is in the message)."""
    port = credential_runs["port"]
    for name in ("train", "register"):
        done = credential_runs[name]
        assert done.returncode == 2, (name, done.stderr[-3000:])
        line = _error_line(done)
        assert f"register.tracking_uri='http://***@127.0.0.1:{port}/'" in line, line
    done = credential_runs["version_fail"]
    assert done.returncode == 2, done.stderr[-3000:]
    assert _error_line(done).startswith(
        f"qa-lora: error: data.dvc_remote='https://***@127.0.0.1:{port}/remote': "
        f"push to https://***@127.0.0.1:{port}/remote failed (3 object(s) failed): Cannot connect to host"
    )
    assert credential_runs["hub"].returncode == 2, credential_runs["hub"].stderr[-3000:]
    assert "qa-lora-org/private-base" in _error_line(credential_runs["hub"])


@pytest.mark.slow  # the journey trains and exports
def test_credentialed_runs_that_succeed_record_masked_uris(credential_runs: dict[str, Any]) -> None:
    for name in ("version_ok", "prepare", "register_ok"):
        done = credential_runs[name]
        assert done.returncode == 0, (name, done.stderr[-3000:])
    assert json.loads(credential_runs["version_json"].read_text())["remote"].startswith("s3://")
    assert any(k.startswith("credentials/files/md5/") for k in credential_runs["s3_objects"])
    run = credential_runs["register_run"]
    effective = (run / "params.effective.yaml").read_text()
    assert f"dvc_remote: https://***@127.0.0.1:{credential_runs['port']}/remote" in effective
    assert (run / "register" / "registration.json").is_file()
    assert credential_runs["registry_state"]["versions"], "the registration reached the registry"


@pytest.mark.slow  # the journey trains and exports
def test_no_planted_credential_reaches_any_file_log_object_or_registry_field(
    journey: dict[str, Any], credential_runs: dict[str, Any], s3_server: LoopbackS3
) -> None:
    """The grep: every file under the home (run dirs, params snapshots, reports, model cards,
    registration.json, both MLflow databases and artifact stores, the DVC remote, every stage's
    stdout+stderr), every object in the S3 bucket, the moto server's log, and the registry's fields
    (tags, params, sources) as MLflow returns them."""
    home: Home = journey["home"]
    needles = [n.encode() for n in credential_runs["needles"]]
    blobs = {str(p): p.read_bytes() for p in _readable_files(home.root)}
    blobs.update({f"s3://{S3_BUCKET}/{k}": v for k, v in credential_runs["s3_objects"].items()})
    blobs["registry fields"] = json.dumps(credential_runs["registry_state"]).encode()
    blobs["moto log"] = s3_server.log_path.read_bytes()
    assert any(p.endswith("registration.json") and "credentials" in p for p in blobs)
    leaks = sorted({(name, n.decode()) for name, blob in blobs.items() for n in needles if n in blob})
    assert not leaks, leaks


# ------------------------------------------------------------------------------------------ constraints


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for raw in (REPO / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"constraints.txt: {raw!r} is not name==version"
        pins[_norm(name.split("[")[0])] = version.strip()
    return pins


# The installer's own tools are not pinned on purpose.
UNPINNED = {"pip", "setuptools", "wheel"}


def _installed_extras(project: Any) -> list[str]:
    """The extras of qa-lora whose requirements are all installed here (dev always counts)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    extras = []
    for extra, requirements in project["optional-dependencies"].items():
        try:
            for text in requirements:
                version(Requirement(text).name)
        except PackageNotFoundError:
            continue
        extras.append(extra)
    return extras


def _requirement_closure(project: Any, extras: list[str]) -> dict[str, str]:
    """Every distribution qa-lora (with `extras`) needs, transitively, as installed: name -> version.

    qa-lora's own requirements from pyproject.toml (an editable install's metadata may be older), the
    rest from the installed metadata with markers evaluated: what `pip install -c constraints.txt
    -e '.[extras]'` resolved, and not whatever else lives in the venv.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    visited: set[tuple[str, tuple[str, ...]]] = set()
    own = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    todo = [(req.name, tuple(sorted(req.extras))) for req in map(Requirement, own)]
    while todo:
        name, wanted = todo.pop()
        if (_norm(name), wanted) in visited:
            continue
        visited.add((_norm(name), wanted))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise AssertionError(f"{name} is required but not installed") from None
        seen[_norm(name)] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if any(req.marker is None or req.marker.evaluate({"extra": e}) for e in ("", *wanted)):
                todo.append((req.name, tuple(sorted(req.extras))))
    return seen


def test_constraints_pin_every_installed_distribution() -> None:
    """What the pins are for: the project's whole requirement tree (dependencies plus the extras
    installed here) installs at exactly the pinned versions. Other packages in the venv are not the
    project's business; a pin the tree does not use must at least match what is installed."""
    import tomllib
    from importlib.metadata import distributions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = _installed_extras(project)
    assert "dev" in extras
    closure = _requirement_closure(project, extras)
    pins = _pins()
    missing = sorted(set(closure) - set(pins) - UNPINNED)
    assert not missing, f"required (extras {extras}) but not pinned in constraints.txt: {missing}"
    installed = {_norm(d.metadata["Name"]): d.version for d in distributions()}
    differ = {n: (installed[n], pins[n]) for n in pins if n in installed and installed[n] != pins[n]}
    assert not differ, f"installed != pinned: {differ}"


def test_pyproject_ranges_admit_the_pinned_versions() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins()
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    checked = 0
    for text in requirements:
        req = Requirement(text)
        name = _norm(req.name)
        assert name in pins, f"{text}: not pinned in constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"{text} refuses pin {pins[name]}"
        )
        checked += 1
    assert checked == len(requirements) > 10


def test_console_script_is_this_checkout() -> None:
    done = subprocess.run(
        [QA_LORA, "--help"], env=secret_env(REPO), capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "validate -> version -> train" in done.stdout
