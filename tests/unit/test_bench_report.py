"""The benchmark table keeps figures imported from other CPU kinds beside this machine's (#17)."""

from __future__ import annotations

import copy
import json

from benchmarks.report import render_table
from tasks.core.config import REPO_ROOT


def _results() -> dict:
    return json.loads((REPO_ROOT / "benchmarks" / "results.json").read_text(encoding="utf-8"))


def test_other_kinds_get_their_own_rows_with_their_own_verdict() -> None:
    results = _results()
    figs = results["figures"]
    other = copy.deepcopy(figs["training"])
    other["figure1"]["stage_vs_bare"] = 0.5
    other.update(machine={"cpu": "Intel Xeon"}, started="2026-01-01 00:00:00")
    figs["training@amx"] = other
    figs["inference@amx"] = {**copy.deepcopy(figs["inference"]), "machine": {"cpu": "Intel Xeon"}}
    figs["inference@amx"]["batch1"]["ort_vs_torch"] = 4.0
    table = render_table(results)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert (
        " 0.50x | >= 0.9x | **no** "
        in rows["1b. train tokens/s: stage vs bare PyTorch+PEFT loop [amx: Intel Xeon, 2026-01-01 00:00:00]"]
    )
    b1 = next(
        v
        for k, v in rows.items()
        if k.startswith("3. generation tokens/s, batch 1: ORT vs PyTorch eager [amx: Intel Xeon")
    )
    assert " 4.00x | >= 3.5x | yes " in b1
    # this machine's own rows are still there, unchanged
    assert "1b. train tokens/s: stage vs bare PyTorch+PEFT loop" in rows


def test_an_imported_kind_that_did_not_measure_adds_no_row() -> None:
    results = _results()
    results["figures"]["training@avx2"] = {"status": "failed", "error": "boom"}
    results["figures"].pop("inference@avx2", None)
    table = render_table(results)
    assert "[avx2:" not in table
