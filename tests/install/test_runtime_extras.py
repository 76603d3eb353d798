"""One ONNX Runtime per environment: the extras in pyproject.toml, and the refusal of none or two at import.

Fast: reads pyproject.toml, constraints.txt and the Makefile, and fakes the installed distributions.
The slow test beside this one installs the AMD extras for real in a throwaway venv.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tasks.core.errors import UserError
from tasks.plumbing.ort_runtime import (
    RUNTIME_EXTRAS,
    describe_runtime,
    import_onnxruntime,
    installed_runtimes,
    runtime_requirement,
)

REPO = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _names(requirements: list[str]) -> list[str]:
    return [_NAME.match(r).group(1).lower().replace("_", "-") for r in requirements]


def test_runtime_is_an_extra_never_a_hard_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [n for n in _names(project["dependencies"]) if n.startswith("onnxruntime")]
    extras = project["optional-dependencies"]
    for extra in ("cpu", "rocm", "migraphx", "cuda"):
        runtimes = [n for n in _names(extras[extra]) if n.startswith("onnxruntime")]
        assert runtimes and len(runtimes) == 1, f"extra {extra!r} must name exactly one runtime"
        assert RUNTIME_EXTRAS[runtimes[0]] == extra
    # every other extra stays free of runtimes, so combining it with one runtime extra keeps one
    others = [e for e in extras if e not in ("cpu", "rocm", "migraphx", "cuda")]
    assert not [n for e in others for n in _names(extras[e]) if n.startswith("onnxruntime")]
    pinned = _names([line for line in (REPO / "constraints.txt").read_text().splitlines() if line.strip()])
    assert set(RUNTIME_EXTRAS) <= set(pinned)
    installed = re.search(r"-e '\.\[([^\]]+)\]'", (REPO / "Makefile").read_text())
    assert installed, "the Makefile installs the project with extras"
    make_extras = set(installed.group(1).split(","))
    assert make_extras & set(RUNTIME_EXTRAS.values()) == {"cpu"}, make_extras  # exactly the CPU runtime


class _Dist:
    """Just enough of importlib.metadata.Distribution for installed_runtimes()."""

    def __init__(self, name: str, version: str, top_level: str) -> None:
        self.metadata = {"Name": name}
        self.version = version
        self._top_level = top_level
        self.files = None

    def read_text(self, filename: str) -> str | None:
        return f"{self._top_level}\n" if filename == "top_level.txt" else None


def _fake_installed(monkeypatch: pytest.MonkeyPatch, *dists: _Dist) -> None:
    decoy = _Dist("onnxruntime-genai", "0.9.0", "onnxruntime_genai")  # ships another package: not a runtime
    others = [d for d in importlib.metadata.distributions() if not str(d.metadata["Name"]).startswith("onnx")]
    everything: list[Any] = [*others, decoy, *dists]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(everything))


def test_no_runtime_is_one_line_naming_the_extras(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tasks.plumbing.onnx_generate import load_onnx_generator

    _fake_installed(monkeypatch)
    assert installed_runtimes() == []
    for attempt in (import_onnxruntime, lambda: load_onnx_generator(tmp_path)):
        with pytest.raises(UserError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message and "no ONNX Runtime is installed" in message
        assert all(f"'.[{extra}]'" in message for extra in ("cpu", "rocm", "migraphx", "cuda"))
    report = describe_runtime()
    assert report["distributions"] == [] and "no ONNX Runtime" in report["problem"]
    assert runtime_requirement() is None


def test_two_runtimes_are_refused_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_installed(
        monkeypatch,
        _Dist("onnxruntime", "1.32.0", "onnxruntime"),
        _Dist("onnxruntime_rocm", "1.22.2.post3", "onnxruntime"),
    )
    assert installed_runtimes() == [("onnxruntime", "1.32.0"), ("onnxruntime-rocm", "1.22.2.post3")]
    with pytest.raises(UserError) as err:
        import_onnxruntime()
    message = str(err.value)
    assert "\n" not in message and "2 ONNX Runtime distributions" in message
    assert "pip uninstall -y onnxruntime onnxruntime-rocm" in message


def test_this_environment_has_one_runtime_and_reports_it() -> None:
    runtimes = installed_runtimes()
    assert len(runtimes) == 1, runtimes
    report = describe_runtime()
    assert report["problem"] is None and report["extra"] == RUNTIME_EXTRAS[runtimes[0][0]]
    assert "CPUExecutionProvider" in report["providers"] and report["auto_provider"]
    assert runtime_requirement() == f"{runtimes[0][0]}=={runtimes[0][1]}"
