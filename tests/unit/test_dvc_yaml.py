"""dvc.yaml cannot drift from the code: every module a stage's command runs is one of its deps.

Each stage's command is `qa-lora <stage>`: the CLI, the runner files it goes through, the stage's package
and everything those import inside `tasks/` (grimp's import graph, function-level imports included), plus
modules a stage starts by name (`python -m tasks.runners.launch`) and every package `__init__` on the way.
A module none of the stage's deps covers is a reproducibility bug: editing it would not make
`dvc repro` rerun the stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest
import yaml

from tasks.runners.dvc_metrics import metrics_file
from tasks.runners.pipeline import EXTRA, STAGES

REPO = Path(__file__).resolve().parents[2]
RUNNER = "tasks.runners.cli"
OTHER_COMMANDS = ("tasks.runners.retention",)  # `qa-lora gc`: no dvc.yaml stage runs it


def _dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _module_file(module: str) -> Path:
    path = REPO.joinpath(*module.split("."))
    return (path / "__init__.py") if path.is_dir() else path.with_suffix(".py")


def _named_modules(graph: grimp.ImportGraph, modules: set[str]) -> set[str]:
    """Modules started by name from these modules' source (e.g. "-m", "tasks.runners.launch")."""
    named = set()
    for module in modules:
        tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in graph.modules:
                named.add(node.value)
    return named


def stage_closure(entry: str) -> set[str]:
    """Every module inside tasks/ that `qa-lora <stage>` can execute, for the stage whose code is `entry`."""
    graph = grimp.build_graph("tasks")
    # The CLI names every stage (the dispatch table, promote/rollback); one command runs one stage.
    for runner in (RUNNER, "tasks.runners.pipeline"):
        for imported in list(graph.find_modules_directly_imported_by(runner)):
            if imported.startswith(("tasks.stages.", *OTHER_COMMANDS)) and not imported.startswith(entry):
                graph.remove_import(importer=runner, imported=imported)
    roots = {RUNNER, entry} | {m for m in graph.modules if m.startswith(entry + ".")}
    modules: set[str] = set()
    while roots - modules:
        new = roots - modules
        modules |= new
        for root in new:
            roots |= graph.find_upstream_modules(root)
        # Started by name (torchrun -m ...) from the stage's own code or plumbing, not the CLI's tables.
        roots |= _named_modules(graph, {m for m in new if not m.startswith("tasks.runners.")})
    parents = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
    return modules | parents


def _entry(stage: str) -> str:
    return {**STAGES, **EXTRA}[stage][0]


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == dep or rel.startswith(dep.rstrip("/") + "/") for dep in deps)


CODE_STAGES = [name for name, stage in _dvc_stages().items() if str(stage["cmd"]).startswith("qa-lora ")]
# Stages that run one of our modules directly: `python -m tasks.<module> ...`.
MODULE_STAGES = {
    name: str(stage["cmd"]).split()[2]
    for name, stage in _dvc_stages().items()
    if str(stage["cmd"]).startswith("python -m tasks.")
}


def test_every_stage_is_checked() -> None:
    assert set(CODE_STAGES) == {"base", "validate", "version", "train", "evaluate", "export", "register"}
    assert MODULE_STAGES == {"plots_template": "tasks.runners.dvc_plots"}
    assert set(_dvc_stages()) == set(CODE_STAGES) | set(MODULE_STAGES), "a stage whose code no test follows"


@pytest.mark.parametrize("stage", sorted(MODULE_STAGES))
def test_deps_cover_a_module_stage_import_closure(stage: str) -> None:
    graph = grimp.build_graph("tasks")
    entry = MODULE_STAGES[stage]
    modules = {entry} | graph.find_upstream_modules(entry)
    modules |= {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
    deps = [str(d) for d in _dvc_stages()[stage].get("deps", [])]
    missing = sorted(
        _module_file(m).relative_to(REPO).as_posix() for m in modules if not _covered(_module_file(m), deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r}: add these to its deps (the stage imports them): {missing}"


@pytest.mark.parametrize("stage", CODE_STAGES)
def test_deps_cover_the_stage_import_closure(stage: str) -> None:
    deps = [str(d) for d in _dvc_stages()[stage].get("deps", [])]
    closure = stage_closure(_entry(stage))
    assert _entry(stage) in closure and RUNNER in closure
    missing = sorted(
        _module_file(m).relative_to(REPO).as_posix() for m in closure if not _covered(_module_file(m), deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r}: add these to its deps (the stage imports them): {missing}"


def test_train_closure_sees_the_torchrun_worker_and_plumbing() -> None:
    # The regressions issue #13 found: train missed dataio/base/tracking; the worker is started by name.
    closure = stage_closure(_entry("train"))
    assert {"tasks.runners.launch", "tasks.plumbing.dataio", "tasks.plumbing.loading"} <= closure
    assert not any(m.startswith(("tasks.stages.evaluate", "tasks.stages.register")) for m in closure)


def test_metrics_are_the_flat_per_stage_files() -> None:
    run = "runs/dvc"
    declared = {
        name: [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
        for name, stage in _dvc_stages().items()
    }
    expected = {
        name: [metrics_file(REPO / run, name).relative_to(REPO).as_posix().replace(run, "${run}")]
        for name in ("validate", "train", "evaluate", "export")
    }
    assert {k: v for k, v in declared.items() if v} == expected


def test_every_output_is_cached_so_experiments_carry_it() -> None:
    # runs/ is git-ignored: a `cache: false` output is in no experiment's commit, so `dvc exp show` cannot
    # read it ("!"), a queued experiment's workspace lacks it (its stage reruns) and `dvc exp apply`
    # cannot restore it (the next `dvc repro` reruns the stage and all after it).
    for name, stage in _dvc_stages().items():
        for entry in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            if isinstance(entry, dict):
                (path, opts), *_ = entry.items()
                assert (opts or {}).get("cache", True), f"{name}: {path} must be cached"


def test_base_output_persists_so_a_built_base_is_reused() -> None:
    (out,) = _dvc_stages()["base"]["outs"]
    assert out == {"models/tiny-base": {"persist": True}}
