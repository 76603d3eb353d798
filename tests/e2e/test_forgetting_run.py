"""A run trained to forget is stopped: it beats the base on the Q&A metric, fails the forgetting rule with
its numbers, and nothing is exported or registered.

The sabotage is the small run's recipe (tests/e2e/small_run.py): the tied embeddings trained in full at
4e-3 for 120 steps without replay. Measured (fp32, AVX2 EPYC, 2026-12-07): perplexity on the held-out
documents +226% (95% CI [+188%, +257%]) while token F1 beats the base (CI low +0.031); at three times the
learning rate +877% and CI low +0.021; with params.yaml's replay (0.1) +51%.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from small_run import SMALL_RUN

from tasks.core.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_a_run_that_forgets_fails_the_gate_and_registers_nothing(tiny_base: Path, tmp_path: Path) -> None:
    import mlflow

    from tasks.runners.pipeline import run_pipeline

    overrides = [
        (f"{section}.{key}", value) for section, keys in SMALL_RUN.items() for key, value in keys.items()
    ]
    overrides += [
        ("base.name_or_path", str(tiny_base)),
        ("data.dvc_remote", str(tmp_path / "dvc-remote")),
        ("register.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"),
        ("eval.cache_dir", None),
        ("gate.max_general_ppl_increase", 0.25),  # on, as in params.yaml (SMALL_RUN turns it off)
    ]
    cfg = load_config(overrides=overrides)
    result = run_pipeline(cfg, tmp_path / "run")

    assert not result["gate"]["passed"]
    assert [r.split(":")[0] for r in result["gate"]["reasons"]] == ["max_general_ppl_increase"], result[
        "gate"
    ]
    assert "export" not in result and "register" not in result
    rules = {r["name"]: r for r in json.loads((tmp_path / "run" / "eval" / "gate.json").read_text())["rules"]}
    assert rules["beats_base:token_f1"]["passed"], rules["beats_base:token_f1"]["detail"]
    forgetting = rules["max_general_ppl_increase"]
    assert forgetting["ci"]["low"] > 0.25, forgetting["detail"]
    report = (tmp_path / "run" / "eval" / "eval_report.md").read_text()
    assert "Gate: FAILED" in report and forgetting["detail"].split(";")[0] in report
    mlflow.set_tracking_uri(cfg.register.tracking_uri)
    assert mlflow.MlflowClient().search_registered_models() == []
    assert not (tmp_path / "run" / "export").exists()
