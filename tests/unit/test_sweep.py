"""The sweep's plain-Python part: points are checked, candidates share the run's data, the best wins."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.core.config import load_config, save_config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout
from tasks.runners.sweep import pick_winner, prepare_candidates, sweep_points


def _parent(tmp_path: Path) -> RunLayout:
    run = RunLayout.of(tmp_path / "run")
    run.data_dir.mkdir(parents=True)
    run.train_split.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    save_config(load_config(), run.effective_params)
    return run


def _evaluated(candidate: dict, f1: float, passed: bool = True) -> None:
    """What the mapped train and evaluate tasks leave in a candidate run."""
    run = RunLayout.of(candidate["run_dir"])
    run.adapter_dir.mkdir(parents=True)
    (run.adapter_dir / "adapter_config.json").write_text(json.dumps({"c": candidate["candidate"]}))
    run.eval_dir.mkdir()
    run.eval_metrics.write_text(
        json.dumps({"candidate": {"token_f1": f1}, "candidate_minus_base": {"token_f1": {"ci_low": f1 / 2}}})
    )
    run.eval_report.write_text("# Evaluation report\n")
    gate = {"passed": passed, "primary_metric": "token_f1", "reasons": [] if passed else ["x"], "rules": []}
    run.gate_file.write_text(json.dumps(gate))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "expected a list of 1 to 8"),
        ({"lora.r": 8}, "expected a list"),
        ([{"lora.r": 8}, "r=16"], "sweep[1]: expected an object"),
        ([{"lora.r": 8}, {"gate.min_improvement": -1}], "sweep[1]: 'gate.min_improvement' cannot be swept"),
        ([{"register.tracking_uri": "sqlite:///x"}], "sweep[0]: 'register.tracking_uri' cannot be swept"),
    ],
)
def test_bad_points_are_refused_naming_point_and_key(raw, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sweep_points(raw)


def test_candidates_share_the_data_and_carry_their_point(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    cands = prepare_candidates(parent.root, [{"lora.r": 4}, {"lora.r": 16, "train.learning_rate": 0.01}])
    assert [c["candidate"] for c in cands] == [0, 1]
    for cand in cands:
        child = RunLayout.of(cand["run_dir"])
        assert child.root.parent == parent.root / "sweep"
        assert child.train_split.read_text() == parent.train_split.read_text()  # linked, not copied
        assert child.data_dir.is_symlink()
    second = load_config(RunLayout.of(cands[1]["run_dir"]).effective_params)
    assert second.lora.r == 16 and second.train.learning_rate == 0.01
    assert second.register == load_config(parent.effective_params).register
    with pytest.raises(UserError, match=r"sweep\[0\]: .*lora.r"):
        prepare_candidates(parent.root, [{"lora.r": 0}])


def test_the_best_candidate_becomes_the_run_and_the_report_lists_all(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    cands = prepare_candidates(parent.root, [{"lora.r": 4}, {"lora.r": 16}, {"lora.r": 8}])
    for cand, f1 in zip(cands, (0.10, 0.30, 0.20), strict=True):
        _evaluated(cand, f1, passed=f1 > 0.15)
    summary = pick_winner(parent.root, cands)
    assert summary["winner"] == 1 and summary["point"] == {"lora.r": 16}
    assert json.loads((parent.adapter_dir / "adapter_config.json").read_text()) == {"c": 1}
    assert load_config(parent.effective_params).lora.r == 16  # export and register see the winner's recipe
    assert json.loads((parent.eval_dir / "sweep.json").read_text())["winner"] == 1
    report = parent.eval_report.read_text()
    assert (
        "## Sweep" in report
        and len(re.findall(r"^\| c\d", report, re.M)) == 3
        and "| c1 (winner) |" in report
    )
    assert report.index("c1 (winner)") < report.index("| c2 |") < report.index("| c0 |")  # best first


def test_a_tie_goes_to_the_smaller_rank(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    cands = prepare_candidates(parent.root, [{"lora.r": 16}, {"lora.r": 4}])
    for cand in cands:
        _evaluated(cand, 0.25)
    assert pick_winner(parent.root, cands)["winner"] == 1
