"""The whole pipeline on one machine (`qa-lora run`), and the run set-up the DAG shares with it.

Order: prepare (effective config, base model) -> validate -> version -> train -> evaluate -> [gate] ->
export -> register. A failed gate stops before export, so nothing is merged, exported or registered.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tasks.artifacts import read_json
from tasks.config import Config, load_config, save_config
from tasks.errors import UserError

log = logging.getLogger("qa_lora.pipeline")

EFFECTIVE_PARAMS = "params.effective.yaml"
STAGE_ORDER = ("validate", "version", "train", "evaluate", "export", "register")


class GateFailed(UserError):
    """The candidate did not pass the regression gate (and gate.on_fail says the run fails)."""


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
    from tasks.config import REPO_ROOT
    from tasks.dataio import resolve_source
    from tasks.tracking import resolve_tracking_uri

    resolve_source(cfg.data.source, cfg.data.allowed_roots, REPO_ROOT)
    resolve_tracking_uri(cfg.register.tracking_uri)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / EFFECTIVE_PARAMS)
    base: dict[str, Any] = {"path": cfg.base.name_or_path, "built": False}
    if cfg.base.kind == "tiny":
        from tasks.base import build_base_model

        base = build_base_model(cfg)
    log.info("run %s prepared (params hash %s)", run_dir, cfg.params_hash())
    return {"run_dir": str(run_dir), "params_hash": cfg.params_hash(), "base": base}


def load_run_config(run_dir: Path) -> Config:
    """The config a run was prepared with (so retries and later tasks never see a changed params.yaml)."""
    path = Path(run_dir) / EFFECTIVE_PARAMS
    if not path.is_file():
        raise UserError(f"{path}: not found; this run was not prepared (run `qa-lora run` or the DAG)")
    return load_config(path)


def gate_result(run_dir: Path) -> dict[str, Any]:
    """The evaluate stage's gate.json for this run."""
    path = Path(run_dir) / "eval" / "gate.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; run the evaluate stage first")
    return read_json(path)


def run_stage(name: str, cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Run one stage function by name, timed and logged."""
    from tasks.cli import resolve_stage

    log.info("stage %s: starting", name)
    start = time.perf_counter()
    result = resolve_stage(name)(cfg, Path(run_dir))
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
            gate = gate_result(run_dir)
            results["gate"] = {"passed": gate["passed"], "reasons": gate.get("reasons", [])}
            if not gate["passed"]:
                why = "; ".join(gate.get("reasons", [])) or "see eval/gate.json"
                msg = f"gate failed: {why}. Nothing merged, exported or registered."
                if cfg.gate.on_fail == "fail":
                    raise GateFailed(msg)
                log.warning("%s", msg)
                break
        results[name] = run_stage(name, cfg, run_dir)
        seconds[name] = round(time.perf_counter() - start, 2)
    results["seconds"] = seconds
    results["run_dir"] = str(run_dir)
    return results
