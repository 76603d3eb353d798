"""The flat per-stage metrics dvc.yaml declares: a few numbers, short unique keys, read from the stages' files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.core.errors import UserError
from tasks.core.layout import RunLayout
from tasks.runners.dvc_metrics import flat_metrics, metrics_file, write_stage_metrics


def _write(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory with result files shaped like the stages write them (nested, with noise)."""
    lay = RunLayout.of(tmp_path)
    _write(
        lay.data_quality,
        {
            "counts": {"rows_in": 120, "rows_out": 110, "dropped": 10, "dropped_by_check": {"blank": 10}},
            "policies": {"blank": "drop"},
            "token_lengths": {"histogram": {"edges": [0, 32], "counts": [3]}, "template": "<s>{q}"},
        },
    )
    _write(
        lay.train_summary,
        {
            "final_train_loss": 1.234567,
            "eval_loss_after": 2.345678,
            "tokens_per_second": 3452.36,
            "steps": 30,
            "device": {"backend": "cpu"},
            "loss_history": [{"step": 10, "loss": 3.0}],
            "adapter_dir": "/x/adapter",
        },
    )
    model = {"token_f1": 0.3, "rouge_l": 0.4, "eos_rate": 1.0}
    _write(
        lay.eval_metrics, {"base": {**model, "token_f1": 0.1}, "candidate": {**model, "distinct_share": 0.75}}
    )
    _write(
        lay.gate_file,
        {
            "passed": True,
            "decision": "pass",
            "primary_metric": "token_f1",
            "reasons": [],
            "rules": [
                {"name": "max_general_ppl_increase", "value": 0.0687654},
                {"name": "max_harness_regression", "value": -0.1051234},
            ],
            "metrics": {"champion": {**model, "token_f1": 0.25}},
            "ci": {"vs_base": {"token_f1": {"mean": 0.2, "low": 0.1523456, "high": 0.25}}},
        },
    )
    _write(
        lay.export_summary,
        {
            "parity": {"onnx": {"max_abs_diff": 3.123e-06, "atol": 1e-4, "tokens_identical": True}},
            "sizes_bytes": {"onnx_fp32": 12_345_678, "merged": 99},
            "serving": {"candidate": {"latency_p50_ms": 12.345, "latency_p95_ms": 20.0}, "champion": None},
            "versions": {"torch": "2.13.0"},
        },
    )
    return tmp_path


def test_each_stage_gives_a_few_flat_numbers(run: Path) -> None:
    assert flat_metrics("validate", run) == {"rows_in": 120, "rows_out": 110}
    assert flat_metrics("train", run) == {"loss": 1.235, "eval_loss": 2.346, "tok_s": 3452, "steps": 30}
    assert flat_metrics("evaluate", run) == {
        "token_f1": 0.3,
        "base": 0.1,
        "champ": 0.25,
        "ci_low": 0.152,
        "gate": 1,
        "unique": 0.75,
        "forget": 0.0688,
        "harness": -0.105,
    }
    assert flat_metrics("export", run) == {"parity": 0.031, "size_mb": 12.3, "p50_ms": 12.3}


def test_keys_are_unique_across_stages_and_values_are_numbers(run: Path) -> None:
    # DVC prefixes a key shared by two files with the file path: a wide, unreadable column.
    seen: list[str] = []
    for stage in ("validate", "train", "evaluate", "export"):
        flat = flat_metrics(stage, run) or {}
        assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat.values())
        assert all("." not in k and "/" not in k and len(k) <= 10 for k in flat)
        seen += flat
    assert len(seen) == len(set(seen))


def test_a_failed_gate_is_zero_and_missing_figures_are_left_out(run: Path) -> None:
    lay = RunLayout.of(run)
    gate = json.loads(lay.gate_file.read_text())
    gate.update(passed=False, decision="fail", reasons=["min_eos_rate"], metrics={"champion": None})
    _write(lay.gate_file, gate)
    _write(lay.eval_metrics, {"base": {"token_f1": 0.1}, "candidate": {"token_f1": 0.2}})
    flat = flat_metrics("evaluate", run)
    assert flat["gate"] == 0
    assert "champ" not in flat and "unique" not in flat


def test_write_for_the_command_that_ran(run: Path) -> None:
    assert write_stage_metrics("version", run) == []
    assert write_stage_metrics("train", run) == [metrics_file(run, "train")]
    written = write_stage_metrics("run", run)
    assert [p.name for p in written] == ["data.json", "train.json", "eval.json", "export.json"]
    assert json.loads(metrics_file(run, "validate").read_text()) == flat_metrics("validate", run)


def test_a_stage_that_wrote_nothing_has_no_metrics(tmp_path: Path) -> None:
    # export after a failed gate: no summary, no metrics file (dvc then reports the missing output).
    assert flat_metrics("export", tmp_path) is None
    assert write_stage_metrics("export", tmp_path) == []


def test_a_broken_result_file_is_one_line_naming_it(run: Path) -> None:
    RunLayout.of(run).train_summary.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"train_summary\.json"):
        flat_metrics("train", run)


def test_dvc_metrics_show_fits_200_columns_in_the_worst_case(run: Path) -> None:
    """Every key present (champ, unique, forget, harness, latency) and wide values, rendered by DVC's own table code."""
    import contextlib
    import io

    from dvc.compare import metrics_table

    wide = {"rows_in": 1_000_000, "rows_out": 999_999, "tok_s": 99_999, "ci_low": -0.01234, "loss": 10.23}
    files = {}
    for stage in ("validate", "train", "evaluate", "export"):
        flat = flat_metrics(stage, run) or {}
        path = metrics_file("runs/dvc", stage).relative_to(Path("runs/dvc").resolve().parent.parent)
        files[path.as_posix()] = {"data": {k: wide.get(k, v) for k, v in flat.items()}}
    assert len(set().union(*(f["data"] for f in files.values()))) == 17  # every key, none shared
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        metrics_table({"": {"data": files}}, precision=5).render()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and max(map(len, lines)) <= 200, out.getvalue()
