"""The whole pipeline on one machine (`qa-lora run`), and the run set-up the DAG shares with it.

Order: prepare (effective config, base model) -> validate -> version -> train -> evaluate -> [gate] ->
export -> register. A failed gate stops before export, so nothing is merged, exported or registered.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.core.config import Config, load_config, save_config
from tasks.core.errors import UserError
from tasks.core.layout import EFFECTIVE_PARAMS, GateFailed, read_gate

log = logging.getLogger("qa_lora.pipeline")

STAGE_ORDER = ("validate", "version", "train", "evaluate", "export", "register")

# subcommand -> (module, function, one-line help). Each function is `fn(cfg, run_dir) -> dict`.
STAGES: dict[str, tuple[str, str, str]] = {
    "validate": ("tasks.stages.validate", "validate_dataset", "validate and split the Q&A dataset (GX)"),
    "version": ("tasks.stages.version", "version_dataset", "snapshot the validated data in DVC and push it"),
    "train": ("tasks.stages.train", "train_adapter", "LoRA SFT of the base model on the train split"),
    "evaluate": ("tasks.stages.evaluate", "evaluate_candidate", "score base/candidate/champion; the gate"),
    "export": ("tasks.stages.export", "export_model", "merge the adapter, export ONNX, check parity"),
    "register": ("tasks.stages.register", "register_model", "register in MLflow; promote if the gate passed"),
}
EXTRA: dict[str, tuple[str, str, str]] = {
    "run": ("tasks.runners.pipeline", "run_pipeline", "run every stage in order on this machine"),
    "base": ("tasks.plumbing.base", "build_base_model", "build (or reuse) the embedded tiny base model"),
}


def prepare_run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Create the run directory, save the effective config, build the tiny base if it is missing.

    Args:
        cfg: the effective configuration of this run (params file + overrides).
        run_dir: the run's directory; every artifact of the run goes below it.

    Returns:
        {"run_dir", "params_hash", "base"}: small JSON for XCom.

    Raises:
        UserError: data.source outside the allowed roots (or missing), or an unsupported
            register.tracking_uri scheme: refused here, before validation, versioning and training.
    """
    # Cheap checks first: a bad dataset path or registry URI in a trigger form fails the first task in
    # seconds instead of after validation, versioning and a trip to the GPU node.
    from tasks.core.config import REPO_ROOT
    from tasks.plumbing.dataio import resolve_source
    from tasks.plumbing.tracking import resolve_tracking_uri

    resolve_source(cfg.data.source, cfg.data.allowed_roots, REPO_ROOT)
    resolve_tracking_uri(cfg.register.tracking_uri)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / EFFECTIVE_PARAMS)
    base: dict[str, Any] = {"path": cfg.base.name_or_path, "built": False}
    if cfg.base.kind == "tiny":
        from tasks.plumbing.base import build_base_model

        base = build_base_model(cfg)
    log.info("run %s prepared (params hash %s)", run_dir, cfg.params_hash())
    return {"run_dir": str(run_dir), "params_hash": cfg.params_hash(), "base": base}


def load_run_config(run_dir: Path) -> Config:
    """The config a run was prepared with (so retries and later tasks never see a changed params.yaml)."""
    path = Path(run_dir) / EFFECTIVE_PARAMS
    if not path.is_file():
        raise UserError(f"{path}: not found; this run was not prepared (run `qa-lora run` or the DAG)")
    return load_config(path)


def resolve_stage(name: str) -> Callable[..., dict[str, Any]]:
    """Import a stage function by subcommand name; heavy imports happen only here."""
    module_name, func_name, _ = {**STAGES, **EXTRA}[name]
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


def run_stage(
    name: str, cfg: Config, run_dir: Path, lineage_parent: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one stage function by name, timed, logged and reported as OpenLineage events.

    Args:
        name: the stage.
        cfg: the run's configuration.
        run_dir: the run directory.
        lineage_parent: the OpenLineage run that runs this stage (an Airflow task); None: the run's own.
    """
    from tasks.runners.lineage import stage_events

    log.info("stage %s: starting", name)
    start = time.perf_counter()
    with stage_events(cfg, name, run_dir, lineage_parent) as event:
        event["result"] = result = resolve_stage(name)(cfg, Path(run_dir))
    log.info("stage %s: done in %.1f s", name, time.perf_counter() - start)
    return result


def run_pipeline(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Run every stage in order on this machine (the DAG's chain without Airflow).

    Args:
        cfg: the effective configuration.
        run_dir: the run's directory.

    Returns:
        Each stage's result, the gate decision and the wall time per stage.

    Raises:
        GateFailed: when the gate fails and `gate.on_fail` is "fail".
    """
    run_dir = Path(run_dir).resolve()
    results: dict[str, Any] = {"prepare": prepare_run(cfg, run_dir)}
    seconds: dict[str, float] = {}
    for name in STAGE_ORDER:
        start = time.perf_counter()
        if name == "export":
            gate = read_gate(run_dir)
            results["gate"] = {"passed": gate["passed"], "reasons": gate["reasons"]}
            if not gate["passed"]:
                if cfg.gate.on_fail == "fail":
                    read_gate(run_dir, require_pass=True)
                log.warning(
                    "gate failed: %s. Nothing merged, exported or registered.", "; ".join(gate["reasons"])
                )
                break
        try:
            results[name] = run_stage(name, cfg, run_dir)
        except GateFailed as exc:  # the export's serving rules refused the candidate
            if cfg.gate.on_fail == "fail":
                raise
            log.warning("%s", exc)
            results["gate"] = {"passed": False, "reasons": [str(exc)]}
            break
        seconds[name] = round(time.perf_counter() - start, 2)
    results["seconds"] = seconds
    results["run_dir"] = str(run_dir)
    return results
