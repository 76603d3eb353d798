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
from conftest import QA_LORA, REPO, SECRET_VALUES, SECRETS, Home, secret_env, write_dataset

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


# The project itself (installed editable) and the installer's own tools are not pinned on purpose.
UNPINNED = {"qa-lora", "pip", "setuptools"}


def test_constraints_pin_every_installed_distribution() -> None:
    from importlib.metadata import distributions

    installed = {_norm(d.metadata["Name"]): d.version for d in distributions()}
    pins = _pins()
    missing = sorted(set(installed) - set(pins) - UNPINNED)
    assert not missing, f"installed but not pinned in constraints.txt: {missing}"
    stale = sorted(set(pins) - set(installed))
    assert not stale, f"pinned but not installed: {stale}"
    differ = {n: (installed[n], pins[n]) for n in pins if installed[n] != pins[n]}
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
