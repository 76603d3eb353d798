"""`qa-lora run`'s order of stages and its two stops: a failed gate, and the export's serving rules.

The stages are faked (each records its name; the real ones have their own tests): what is tested is the
runner's decision, skip or fail, as `gate.on_fail` says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tasks.core.config import load_config
from tasks.core.layout import GateFailed
from tasks.runners import pipeline


def _fake_stages(monkeypatch: pytest.MonkeyPatch, run_dir: Path, refuse_export: bool) -> list[str]:
    ran: list[str] = []

    def stage(name: str, cfg: Any, where: Path) -> dict:
        ran.append(name)
        if name == "evaluate":
            (where / "eval").mkdir(parents=True, exist_ok=True)
            (where / "eval" / "gate.json").write_text(json.dumps({"passed": True, "reasons": []}))
        if name == "export" and refuse_export:
            raise GateFailed(
                "serving gate failed: max_size_regression: candidate 12.5 MiB vs champion v3 10.0 MiB"
            )
        return {"stage": name}

    monkeypatch.setattr(pipeline, "prepare_run", lambda cfg, where: {"run_dir": str(where)})
    monkeypatch.setattr(pipeline, "run_stage", stage)
    return ran


def test_every_stage_runs_in_order_when_nothing_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = _fake_stages(monkeypatch, tmp_path, refuse_export=False)
    result = pipeline.run_pipeline(load_config(), tmp_path)
    assert ran == list(pipeline.STAGE_ORDER) and result["gate"]["passed"]


def test_a_serving_refusal_stops_before_register_or_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = _fake_stages(monkeypatch, tmp_path, refuse_export=True)
    result = pipeline.run_pipeline(load_config(overrides=["gate.on_fail=skip"]), tmp_path)
    assert ran[-1] == "export" and "register" not in ran and "register" not in result
    assert result["gate"]["passed"] is False
    assert result["gate"]["reasons"] == [
        "serving gate failed: max_size_regression: candidate 12.5 MiB vs champion v3 10.0 MiB"
    ]

    ran.clear()
    with pytest.raises(GateFailed, match="max_size_regression"):
        pipeline.run_pipeline(load_config(overrides=["gate.on_fail=fail"]), tmp_path)
    assert "register" not in ran
