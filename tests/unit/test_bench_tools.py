"""The benchmark harness's bookkeeping (not its timings): merging a GPU node's results, steady state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu, run


def _gpu_figure() -> dict:
    return {
        "status": "measured",
        "machine": {"versions": {"torch": "2.11.0"}, "gpus": ["NVIDIA H100 80GB HBM3"]},
        "started": "2026-11-27 21:14:47",
        "gpu": "NVIDIA H100 80GB HBM3",
        "batch_size": 16,
        "stage_tokens_per_s": 35335.0,
        "stage_vs_naive": 3.08,
        "stage_vs_bare": 0.91,
        "stage_mfu": 0.221,
        "stage_mfu_6n": 0.33,
        "bare_mfu": 0.307,
        "variants": [{"batch": 8, "mfu": 0.2}, {"batch": 32, "mfu": 0.323}, {"batch": 64, "error": "OOM"}],
        "steady_state": {"steps": 21, "mfu": 0.294},
        "kernel_time": {"share": {"gemm": 0.35, "attention": 0.05}},
    }


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    local = tmp_path / "results.json"
    md = tmp_path / "RESULTS.md"
    local.write_text(
        json.dumps(
            {"machine": {"cpu": "AMD EPYC"}, "figures": {"dag": {"status": "failed", "error": "boom"}}}
        )
    )
    md.write_text("# Benchmark results\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nnotes kept\n")
    monkeypatch.setattr(run, "RESULTS_JSON", local)
    monkeypatch.setattr(run, "RESULTS_MD", md)
    return local, md


def test_import_merges_the_gpu_figure_and_keeps_this_machine(
    results: tuple[Path, Path], tmp_path: Path
) -> None:
    local, md = results
    other = tmp_path / "node.json"
    other.write_text(json.dumps({"machine": {"cpu": "Xeon"}, "figures": {"gpu": _gpu_figure()}}))

    assert run.main(["--import-from", str(other)]) == 0

    merged = json.loads(local.read_text())
    assert merged["machine"] == {"cpu": "AMD EPYC"}  # the CPU figures' machine is untouched
    assert merged["figures"]["dag"] == {"status": "failed", "error": "boom"}
    assert merged["figures"]["gpu"]["machine"]["gpus"] == ["NVIDIA H100 80GB HBM3"]
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 7."))
    assert "| 22.1% | >= 35% | **no** |" in row
    assert "best bare variant batch 32: 32.3%" in row and "(21 steps): 29.4%" in row
    assert "old" not in text and text.endswith("notes kept\n")


def test_import_refuses_a_file_without_the_figure(
    results: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local, _ = results
    before = local.read_text()
    other = tmp_path / "node.json"
    other.write_text(json.dumps({"figures": {"training": {"status": "measured"}}}))

    assert run.main(["--import-from", str(other)]) == 2
    assert "no figure 'gpu'" in capsys.readouterr().err
    assert run.main(["--import-from", str(tmp_path / "missing.json")]) == 2
    assert local.read_text() == before


def test_steady_state_counts_only_shapes_seen_before() -> None:
    def batch(length: int) -> dict:
        return {"input_ids": torch.zeros(2, length), "attention_mask": torch.ones(2, length)}

    batches = [batch(8), batch(16), batch(8), batch(16), batch(24), batch(8)]
    trainer = [1.0, 1.0, 0.5, 0.5, 2.0, 0.5]
    bare = [0.4, 0.4, 0.4, 0.4, 0.4, 0.4]

    out = gpu.steady_state(batches, trainer, bare, warmup=1)

    # step 0 is warm-up, steps 1 (16) and 4 (24) meet a new shape: steps 2, 3 and 5 remain
    assert out["steps"] == 3
    assert out["trainer_tokens_per_s"] == pytest.approx((16 + 32 + 16) / 1.5)
    assert out["stage_vs_bare"] == pytest.approx(1.2 / 1.5)
